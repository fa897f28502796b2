//! The network namespace the reference suite runs in. Nothing in it leads anywhere else:
//!
//! ```text
//!   netns krs-anp<id>   (no default route, IPv4 or IPv6)
//!   lo        127.0.0.1, 192.0.2.53       the suite's servers and agents; the NXDOMAIN resolver on .53
//!   bh-out    192.0.2.1/32                198.18.0.0/15 is routed here; 198.18.0.254 has a permanent
//!     │ veth                               neighbour entry with a MAC that no interface has
//!   bh-in     no address, another MAC     receives those frames and drops them (not addressed to it)
//! ```
//!
//! Two reference tests dial 198.18.0.254 expecting the dial to hang (the SYN goes out and nothing ever
//! answers), and one resolves a name that must not exist. `ip netns exec` bind-mounts the files of
//! `/etc/netns/<name>/` over `/etc`: a `resolv.conf` naming only the namespace's own resolver, an
//! `nsswitch.conf` that resolves host names from files and DNS only (no NSS module that could ask a daemon
//! outside the namespace over a Unix socket), and a `hosts` with localhost alone.

use anyhow::{Context, bail};
use konnectivity_it::netns::NetNs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Where the reference's tests dial when they want a dial that never completes.
pub const BLACKHOLE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// The namespace's resolver (TEST-NET-1, RFC 5737): an address of its own, so that a process resolving
/// through the host's resolver instead (127.0.0.53 and the like) cannot be mistaken for one using it.
pub const RESOLVER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)), 53);
/// The source address of what is sent into the blackhole.
const HOLE_SOURCE: &str = "192.0.2.1";
const HOLE_ROUTE: &str = "198.18.0.0/15";
const HOLE_OUT: &str = "bh-out";
const HOLE_IN: &str = "bh-in";
/// Locally administered unicast MACs: the receiving end has one, the blackhole's neighbour entry the other.
const HOLE_IN_MAC: &str = "02:00:5e:00:b1:01";
const NOBODYS_MAC: &str = "02:00:5e:00:b1:fe";
/// An address outside everything the namespace has: it must have no route to it.
const ELSEWHERE: &str = "203.0.113.1";

/// The namespace and its `/etc/netns/<name>/` files, both removed when dropped.
pub struct SuiteNetwork {
    ns: NetNs,
    etc: PathBuf,
}

impl SuiteNetwork {
    /// Creates the namespace `name` (a stale one of that name is replaced) and its resolver files.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let ns = NetNs::create(name)?;
        let etc = PathBuf::from("/etc/netns").join(name);
        // From here on a failure drops `network`, which removes both.
        let network = Self { ns, etc };
        network.build_blackhole()?;
        network.ns.ip(&["addr", "add", &format!("{}/32", RESOLVER.ip()), "dev", "lo"])?;
        network.write_etc()?;
        Ok(network)
    }

    fn build_blackhole(&self) -> anyhow::Result<()> {
        let ns = &self.ns;
        ns.ip(&["link", "add", HOLE_OUT, "type", "veth", "peer", "name", HOLE_IN])?;
        ns.ip(&["link", "set", HOLE_IN, "address", HOLE_IN_MAC])?;
        for dev in [HOLE_OUT, HOLE_IN] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
        ns.ip(&["addr", "add", &format!("{HOLE_SOURCE}/32"), "dev", HOLE_OUT])?;
        ns.ip(&["route", "add", HOLE_ROUTE, "dev", HOLE_OUT, "src", HOLE_SOURCE])?;
        ns.ip(&["neigh", "add", &BLACKHOLE.to_string(), "lladdr", NOBODYS_MAC, "dev", HOLE_OUT, "nud", "permanent"])
    }

    fn write_etc(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.etc).with_context(|| format!("creating {}", self.etc.display()))?;
        let header = "# konnectivity-it reference_suite: removed with the namespace\n";
        for (file, text) in [
            ("resolv.conf", format!("{header}nameserver {}\n", RESOLVER.ip())),
            ("nsswitch.conf", format!("{header}passwd: files\ngroup: files\nhosts: files dns\n")),
            ("hosts", format!("{header}127.0.0.1 localhost\n::1 localhost\n")),
        ] {
            let path = self.etc.join(file);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// The namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// Fails unless the namespace is closed: no default route (IPv4, IPv6) and no route to an outside address.
    pub fn check_closed(&self) -> anyhow::Result<()> {
        for family in ["-4", "-6"] {
            let routes = self.ip_output(&[family, "route", "show", "default"])?;
            if !routes.trim().is_empty() {
                bail!("netns {} has a default route ({family}): {routes}", self.ns.name());
            }
        }
        if let Ok(route) = self.ip_output(&["route", "get", ELSEWHERE]) {
            bail!("netns {} has a route to {ELSEWHERE}: {route}", self.ns.name());
        }
        Ok(())
    }

    /// How many frames the blackhole has swallowed.
    pub fn blackholed_frames(&self) -> anyhow::Result<u64> {
        // /sys shows the namespace of whoever mounted it; `ip netns exec` mounts the namespace's own.
        let path = format!("/sys/class/net/{HOLE_IN}/statistics/rx_packets");
        let out = Command::new("ip")
            .args(["netns", "exec", self.ns.name(), "cat", &path])
            .stdin(Stdio::null())
            .output()
            .context("running ip netns exec")?;
        String::from_utf8_lossy(&out.stdout).trim().parse().with_context(|| format!("reading {path}"))
    }

    /// The pids of the processes in the namespace.
    pub fn pids(&self) -> anyhow::Result<Vec<u32>> {
        let out = Command::new("ip").args(["netns", "pids", self.ns.name()]).stdin(Stdio::null()).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
    }

    fn ip_output(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip").args(["-n", self.ns.name()]).args(args).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for SuiteNetwork {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.etc);
        // `self.ns` is deleted by its own Drop, after this.
    }
}
