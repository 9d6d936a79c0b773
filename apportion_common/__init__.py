"""What the scheduler, the workers, the client SDK and the command line share.

Resource parsing and fixed-point amounts, serialization, the checks at the
wire boundary, security, settings and the gRPC plumbing. It imports no
service: the services import it, and the command line (:mod:`apportion`)
imports them all. The public Python API lives in :mod:`client_sdk`.
"""
