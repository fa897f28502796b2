//! Free loopback ports, for programs that take a port number rather than reporting the one they bound.

/// A loopback port that was free a moment ago, in the range the Go reference accepts (it refuses ports above
/// 49151). Prefer port 0 wherever the program under test reports what it bound.
///
/// Panics if no loopback port can be bound at all.
pub fn free_port() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("no loopback port: {e}"));
        let port = listener.local_addr().unwrap_or_else(|e| panic!("no loopback port: {e}")).port();
        if (1024..=49151).contains(&port) {
            return port;
        }
    }
}
