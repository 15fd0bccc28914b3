"""Exit 0 only when a server's grpc.health.v1 says SERVING: for a container HEALTHCHECK or an exec probe.

    python -m mistral_grpc.server.healthcheck 127.0.0.1:50051                    # loaded and not draining
    python -m mistral_grpc.server.healthcheck 127.0.0.1:50051 --service liveness # the process answers
    python -m mistral_grpc.server.healthcheck 127.0.0.1:50051 --tls-ca ca.pem --tls-server-name mistral.example

Anything else (NOT_SERVING, an unknown service, nothing listening, no answer in time) exits 1. One line
on stdout says what was seen (Docker keeps it in `docker inspect`).

It imports nothing from mistral_grpc, so it also runs as a plain file (`python .../healthcheck.py`), as the
image's HEALTHCHECK does: that skips importing the package (and torch) on every check.
"""

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 5.0, root_certificates: bytes | None = None,
          server_name: str | None = None) -> str:
    """The serving status's name ("SERVING", "NOT_SERVING", ...); raises grpc.RpcError when no answer comes.
    root_certificates (PEM) switches to TLS; server_name is the name the certificate must carry when it is
    not the target's host (a probe dials 127.0.0.1, the certificate names the service)."""
    if root_certificates is None:
        channel = grpc.insecure_channel(target)
    else:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=options)
    with channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mistral_grpc.server.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="host:port (default %(default)s)")
    parser.add_argument("--service", default="", help="'' (default: the whole server), "
                                                      "mistral.chat.v1.ChatService, or liveness")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    parser.add_argument("--tls-ca", help="PEM of the CA that signed the server's --tls-cert (switches to TLS)")
    parser.add_argument("--tls-server-name", help="the name in the server's certificate, if not the target's host")
    args = parser.parse_args(argv)
    root_certificates = None
    if args.tls_ca is not None:
        with open(args.tls_ca, "rb") as file:
            root_certificates = file.read()
    what = f"{args.target} {args.service or '(server)'}"
    try:
        status = check(args.target, args.service, args.timeout, root_certificates, args.tls_server_name)
    except grpc.RpcError as error:
        # A failed call raises an error that is also its grpc.Call (code and details).
        call = error if isinstance(error, grpc.Call) else None
        details = call.details() if call else str(error)
        print(f"{what}: {call.code().name if call else 'ERROR'}" + (f" ({details})" if details else ""))
        return 1
    print(f"{what}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
