//! `v1` Nodes: the one read proxy-server needs, a node's addresses, to check what an agent bound to that node
//! may claim to serve.

use crate::{Client, KubeError};
use http::Method;
use serde::Deserialize;

/// One of a node's addresses (`status.addresses[]`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct NodeAddress {
    /// `InternalIP`, `ExternalIP`, `Hostname`, `InternalDNS` or `ExternalDNS`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The address.
    pub address: String,
}

impl Client {
    /// The addresses of node `name` (its `status.addresses`), or `None` if there is no such node.
    pub async fn get_node_addresses(&self, name: &str) -> Result<Option<Vec<NodeAddress>>, KubeError> {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Status {
            addresses: Vec<NodeAddress>,
        }
        #[derive(Deserialize)]
        struct Node {
            #[serde(default)]
            status: Status,
        }
        match self.call(Method::GET, &format!("/api/v1/nodes/{}", crate::lease::escape(name)), None).await {
            Ok(body) => serde_json::from_slice::<Node>(&body)
                .map(|n| Some(n.status.addresses))
                .map_err(|e| KubeError::Decode { what: "Node", cause: e.to_string() }),
            Err(e) if e.code() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_decode() {
        let a: Vec<NodeAddress> = serde_json::from_value(serde_json::json!([
            {"type": "InternalIP", "address": "10.0.0.5"}, {"type": "Hostname", "address": "node-a"}
        ]))
        .expect("addresses");
        assert_eq!(a[0], NodeAddress { kind: "InternalIP".into(), address: "10.0.0.5".into() });
        assert_eq!(a[1].address, "node-a");
    }
}
