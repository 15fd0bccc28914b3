// Stop strings for one generated sequence, matched on the host in the decoded text as it grows.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mistral_grpc {

// Feeds on decoded text (UTF-8) piece by piece and says what may be emitted now: everything up to
// the first stop string, minus a held-back tail that could still become the start of one. A stop
// matches across any piece boundaries; the first one to end wins (the longest of those ending at
// the same byte), and neither it nor anything after it is emitted. Aho-Corasick over bytes, so a
// piece costs O(its length) whatever the number and length of the stop strings.
class StopMatcher {
 public:
  explicit StopMatcher(const std::vector<std::string>& stops);

  // Appends `text` and returns the part that is now safe to emit ("" once stopped).
  std::string push(const std::string& text);
  // End of generation: returns the held-back tail, which no stop string can complete any more.
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> children;
    int32_t fail = 0;   // the node of the longest proper suffix that is also a stop prefix
    int32_t depth = 0;  // bytes from the root
    int32_t match = 0;  // length of the longest stop string ending at this node (0: none)
  };

  int32_t child(int32_t node, unsigned char byte) const;
  int32_t step(int32_t node, unsigned char byte) const;
  void link_failures();

  std::vector<Node> nodes_;
  int32_t state_ = 0;
  std::string pending_;  // received but not emitted: exactly the last nodes_[state_].depth bytes
  bool stopped_ = false;
};

// Binds StopMatcher into the extension module as mistral_grpc._C.StopMatcher.
void bind_stop_matcher(pybind11::module_& m);

}  // namespace mistral_grpc
