//! Agent streams: who each is ([`identifiers`], [`stream`]), the registry that picks one for a dial
//! ([`manager`]), and the `/AgentService/Connect` service that accepts and reads them ([`service`]).

pub(crate) mod identifiers;
pub(crate) mod manager;
pub(crate) mod service;
pub(crate) mod stream;
