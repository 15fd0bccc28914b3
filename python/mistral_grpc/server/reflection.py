"""Server reflection under both names clients use: grpc.reflection.v1 and grpc.reflection.v1alpha.

grpcio-reflection ships only v1alpha. v1 is the same protocol under another package: the same
messages, field for field, so the same bytes on the wire. Newer clients (grpcurl >= 1.9, Postman, Go's
and Java's reflection clients) ask v1 first; older ones (grpcurl 1.8) only v1alpha. One servicer
answers both: v1 calls are decoded and encoded with the v1alpha messages, and v1's descriptor (v1alpha's
renamed) joins the descriptor pool so that clients can describe the v1 service too.
"""

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

V1ALPHA_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection for service_names and for both reflection services themselves."""
    _add_v1_descriptor()
    servicer = ReflectionServicer((*service_names, V1_SERVICE, V1ALPHA_SERVICE))
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method})
        for name in (V1_SERVICE, V1ALPHA_SERVICE)])


def _add_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return  # a second server in this process (tests), or another library, added it
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old_prefix, new_prefix = f".{file.package}.", f".{V1_PACKAGE}."
    file.name, file.package = _V1_FILE, V1_PACKAGE
    file.ClearField("options")  # v1alpha's language packages would name the wrong package
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old_prefix, new_prefix, 1)
    for service in file.service:
        for rpc in service.method:
            rpc.input_type = rpc.input_type.replace(old_prefix, new_prefix, 1)
            rpc.output_type = rpc.output_type.replace(old_prefix, new_prefix, 1)
    pool.Add(file)
