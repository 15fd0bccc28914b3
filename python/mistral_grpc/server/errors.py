"""The errors a call can end with, as gRPC statuses a person can act on.

Every failure the servicer knows about becomes a RequestError (a code, a message and, for bad fields,
google.rpc.BadRequest field violations sent in the status details); anything else is INTERNAL with a
generic message, its traceback going to the server log only.
"""

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from mistral_grpc.engine.request import EngineUnavailableError, PromptTooLongError, QueueFullError
from mistral_grpc.tokenizer import TemplateError


@dataclass
class RequestError(Exception):
    code: grpc.StatusCode
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)  # (field path, what is wrong)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.violations:
            bad_request = error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=name, description=description)
                for name, description in self.violations])
            detail = any_pb2.Any()
            detail.Pack(bad_request)
            status.details.append(detail)
        return rpc_status.to_status(status)


def invalid_argument(violations: list[tuple[str, str]]) -> RequestError:
    """One INVALID_ARGUMENT naming every bad field, so a caller fixes them all in one go."""
    summary = "; ".join(f"{name}: {description}" for name, description in violations)
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {summary}", violations)


def describe(error: Exception) -> RequestError | None:
    """The status for an error the servicer, the template or the engine raised; None for a failure
    nobody foresaw (INTERNAL)."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, TemplateError):
        return invalid_argument([(error.field or "messages", str(error))])
    if isinstance(error, PromptTooLongError):
        return invalid_argument([(error.field, str(error))])
    if isinstance(error, QueueFullError):
        # The engine's reason may end in its own retry advice: say it once, at the end.
        reason = str(error).removesuffix("; retry later").removesuffix(", retry later")
        return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is at capacity: {reason}; "
                                                                "retry with backoff")
    if isinstance(error, EngineUnavailableError):
        return RequestError(grpc.StatusCode.UNAVAILABLE, f"the model is not serving: {error}")
    return None


UNAVAILABLE_LOADING = RequestError(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
UNAVAILABLE_DRAINING = RequestError(grpc.StatusCode.UNAVAILABLE,
                                    "the server is shutting down; retry on another replica")


def server_stopping(reason: str) -> RequestError:
    """For a call the stopping server ends before it finished."""
    return RequestError(grpc.StatusCode.UNAVAILABLE, f"the server is stopping: {reason}; retry on another replica")


UNAUTHENTICATED = RequestError(grpc.StatusCode.UNAUTHENTICATED,
                               "missing or wrong API key: send the metadata 'authorization: Bearer <key>'")


def internal(incident: str) -> RequestError:
    return RequestError(grpc.StatusCode.INTERNAL,
                        f"internal server error (incident {incident}); the server log has the details")

