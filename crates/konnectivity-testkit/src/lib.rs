//! Fixtures shared by the integration tests (`konnectivity-it`) and the benchmark (`konnectivity-bench`): a
//! throwaway PKI made with rcgen ([`pki`]), a temporary directory removed on drop ([`TempDir`]), a child process
//! stopped on drop ([`ChildProcess`]) and a free loopback port ([`free_port`]).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod child_process;
pub mod pki;
mod ports;
mod temp_dir;

pub use child_process::{ChildProcess, Signal};
pub use ports::free_port;
pub use temp_dir::TempDir;
