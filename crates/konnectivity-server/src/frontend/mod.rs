//! The frontends kube-apiserver dials through: gRPC ([`grpc`]) and HTTP CONNECT ([`http_connect`]), peers over
//! one frontend-session core ([`session`]), served on a Unix socket or mutual-TLS TCP ([`listen`]).

pub(crate) mod grpc;
pub(crate) mod http_connect;
pub(crate) mod listen;
pub(crate) mod session;
