// Aho-Corasick stop-string matching for StopMatcher (see stop_matcher.h).
//
// Every cut lands on a UTF-8 code point boundary without decoding: a cut falls either where a
// stop string starts or where a held-back tail starts, and both begin with a stop string's first
// byte, which is never a continuation byte (10xxxxxx); in valid UTF-8 such a byte starts a code
// point. Pieces arrive as whole Python strings, so their ends are boundaries too.
#include "stop_matcher.h"

#include <pybind11/stl.h>

#include <deque>
#include <stdexcept>

namespace mistral_grpc {

StopMatcher::StopMatcher(const std::vector<std::string>& stops) : nodes_(1) {
  for (const std::string& stop : stops) {
    if (stop.empty()) throw std::invalid_argument("StopMatcher: stop strings must not be empty");
    int32_t node = 0;
    for (const char c : stop) {
      const auto byte = static_cast<unsigned char>(c);
      int32_t next = child(node, byte);
      if (next == 0) {
        next = static_cast<int32_t>(nodes_.size());
        nodes_.push_back(Node{.children = {}, .fail = 0, .depth = nodes_[node].depth + 1, .match = 0});
        nodes_[node].children.emplace_back(byte, next);
      }
      node = next;
    }
    nodes_[node].match = nodes_[node].depth;
  }
  link_failures();
}

int32_t StopMatcher::child(int32_t node, unsigned char byte) const {
  for (const auto& [b, next] : nodes_[node].children)
    if (b == byte) return next;
  return 0;  // the root is nobody's child
}

int32_t StopMatcher::step(int32_t node, unsigned char byte) const {
  while (true) {
    if (const int32_t next = child(node, byte)) return next;
    if (node == 0) return 0;
    node = nodes_[node].fail;
  }
}

// Breadth-first, so a node's failure target (strictly shallower) is final before it is used.
void StopMatcher::link_failures() {
  std::deque<int32_t> queue;
  for (const auto& [byte, next] : nodes_[0].children) queue.push_back(next);
  while (!queue.empty()) {
    const int32_t node = queue.front();
    queue.pop_front();
    for (const auto& [byte, next] : nodes_[node].children) {
      Node& n = nodes_[next];
      n.fail = step(nodes_[node].fail, byte);
      if (n.match == 0) n.match = nodes_[n.fail].match;
      queue.push_back(next);
    }
  }
}

std::string StopMatcher::push(const std::string& text) {
  if (stopped_) return {};
  pending_ += text;
  const size_t first_new = pending_.size() - text.size();
  for (size_t i = first_new; i < pending_.size(); ++i) {
    state_ = step(state_, static_cast<unsigned char>(pending_[i]));
    if (const int32_t match = nodes_[state_].match) {
      stopped_ = true;
      std::string safe = pending_.substr(0, i + 1 - match);
      pending_.clear();
      return safe;
    }
  }
  const size_t held = static_cast<size_t>(nodes_[state_].depth);
  std::string safe = pending_.substr(0, pending_.size() - held);
  pending_.erase(0, pending_.size() - held);
  return safe;
}

std::string StopMatcher::flush() {
  std::string tail = std::move(pending_);
  pending_.clear();
  state_ = 0;
  return tail;
}

void bind_stop_matcher(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<StopMatcher>(m, "StopMatcher",
                          "Stop strings for one generated sequence: push decoded text, emit what it returns.")
      .def(py::init<const std::vector<std::string>&>(), py::arg("stops"))
      .def("push", &StopMatcher::push, py::arg("text"),
           "Appends decoded text; returns the text safe to emit now (never part of a stop string).")
      .def("flush", &StopMatcher::flush, "At the end of generation: returns the held-back tail.")
      .def_property_readonly("stopped", &StopMatcher::stopped, "Whether a stop string matched.");
}

}  // namespace mistral_grpc
