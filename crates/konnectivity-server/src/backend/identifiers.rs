//! What an agent says it serves: its `agentidentifiers` header, in the reference's URL-query form.

/// What an agent advertised in its `agentidentifiers` header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentIdentifiers {
    /// `host` values.
    pub hosts: Vec<String>,
    /// `ipv4` values.
    pub ipv4: Vec<String>,
    /// `ipv6` values.
    pub ipv6: Vec<String>,
    /// `cidr` values.
    pub cidrs: Vec<String>,
    /// `default-route` (only the first value counts, as in the reference).
    pub default_route: bool,
}

impl AgentIdentifiers {
    /// Parses the URL-query form. Unknown keys are ignored, as the reference server does.
    pub fn parse(query: &str) -> Self {
        let mut ids = Self::default();
        let mut saw_default_route = false;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "host" => ids.hosts.push(v.into_owned()),
                "ipv4" => ids.ipv4.push(v.into_owned()),
                "ipv6" => ids.ipv6.push(v.into_owned()),
                "cidr" => ids.cidrs.push(v.into_owned()),
                "default-route" if !saw_default_route => {
                    saw_default_route = true;
                    ids.default_route = v.parse().unwrap_or(false);
                }
                _ => {}
            }
        }
        ids
    }
}
