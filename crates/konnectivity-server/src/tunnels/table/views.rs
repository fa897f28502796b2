//! Read-only views of the tunnel table: counts, the `/debug/connections` lists, and the consistency check the
//! fuzzing harness runs after every step.

use super::Tunnels;
use std::sync::atomic::Ordering;

impl Tunnels {
    /// Number of dials waiting for an agent's answer.
    pub(crate) fn pending_count(&self) -> usize {
        self.table.lock().pending.len()
    }

    /// Connections established (including ones whose close is in progress).
    pub(crate) fn connection_count(&self) -> usize {
        self.table.lock().conns.len()
    }

    /// The pending dials, for `/debug/connections`.
    pub(crate) fn pending_snapshot(&self) -> Vec<serde_json::Value> {
        self.table
            .lock()
            .pending
            .iter()
            .map(|(random, d)| {
                serde_json::json!({
                    "dial_id": random,
                    "address": d.address,
                    "agent_id": d.backend.agent_id,
                    "age_seconds": d.started.elapsed().as_secs_f64(),
                    "frontend": d.frontend.kind,
                })
            })
            .collect()
    }

    /// The connections, for `/debug/connections`.
    pub(crate) fn connections_snapshot(&self) -> Vec<serde_json::Value> {
        self.table
            .lock()
            .conns
            .iter()
            .map(|((_, connect_id), conn)| match &conn.owner {
                Some(frontend) => serde_json::json!({
                    "agent_id": conn.link.backend.agent_id,
                    "connect_id": connect_id,
                    "dial_id": conn.link.dial_id,
                    "address": conn.link.address,
                    "frontend": frontend.kind,
                    "state": "open",
                    "age_seconds": conn.link.established.elapsed().as_secs_f64(),
                    "bytes_to_frontend": conn.link.to_frontend.load(Ordering::Relaxed),
                    "bytes_to_agent": conn.link.to_agent.load(Ordering::Relaxed),
                    "queued_bytes": frontend.queued(),
                }),
                None => serde_json::json!({
                    "agent_id": conn.link.backend.agent_id, "connect_id": connect_id, "state": "closing"
                }),
            })
            .collect()
    }

    /// Checks that the table's indexes agree with each other; panics naming the first disagreement (for the
    /// fuzzing harness and tests). Returns (pending dials, connections).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn check_consistency(&self) -> (usize, usize) {
        let t = self.table.lock();
        for (random, d) in &t.pending {
            let f = t.frontends.get(&d.frontend.serial);
            assert!(f.is_some_and(|f| f.dials.contains(random)), "dial {random} pending for a frontend that is gone");
            let a = t.agents.get(&d.backend.serial);
            assert!(
                a.is_some_and(|a| a.dials.contains(random)),
                "dial {random} pending on an agent stream that is gone"
            );
        }
        for (serial, f) in &t.frontends {
            for random in &f.dials {
                assert!(
                    t.pending.get(random).is_some_and(|d| d.frontend.serial == *serial),
                    "frontend {serial} lists dial {random} not pending for it"
                );
            }
            for key in &f.conns {
                let owner = t.conns.get(key).and_then(|c| c.owner.as_ref()).map(|o| o.serial);
                assert_eq!(owner, Some(*serial), "frontend {serial} lists connection {key:?} it does not own");
            }
        }
        for (serial, a) in &t.agents {
            for random in &a.dials {
                assert!(
                    t.pending.get(random).is_some_and(|d| d.backend.serial == *serial),
                    "agent stream {serial} lists dial {random} not pending on it"
                );
            }
            for id in &a.conns {
                assert!(
                    t.conns.contains_key(&(*serial, *id)),
                    "agent stream {serial} lists connection {id} it does not have"
                );
            }
        }
        for ((serial, id), conn) in &t.conns {
            let a = t.agents.get(serial);
            assert!(
                a.is_some_and(|a| a.conns.contains(id)),
                "connection {id} of agent stream {serial}, which is gone or does not list it"
            );
            assert_eq!(
                conn.link.backend.connection_count(),
                a.map_or(0, |a| a.conns.len()),
                "connection count of agent stream {serial}"
            );
            if let Some(owner) = &conn.owner {
                let f = t.frontends.get(&owner.serial);
                assert!(
                    f.is_some_and(|f| f.conns.contains(&(*serial, *id))),
                    "connection {id} of agent stream {serial} is open but its frontend does not list it"
                );
            }
        }
        (t.pending.len(), t.conns.len())
    }

    /// Whether the table still knows frontend `serial` / agent stream `serial` (for the fuzzing harness).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn knows_stream(&self, serial: u64) -> bool {
        let t = self.table.lock();
        t.frontends.contains_key(&serial) || t.agents.contains_key(&serial)
    }
}
