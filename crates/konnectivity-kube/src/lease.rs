//! `coordination.k8s.io/v1` Leases: the objects, the calls, and expiry as the reference computes it.

use crate::{Client, KubeError};
use http::Method;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Object metadata (the fields Leases need).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectMeta {
    /// Name.
    pub name: String,
    /// Namespace.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Resource version (optimistic concurrency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// Lease spec.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct LeaseSpec {
    /// Holder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder_identity: Option<String>,
    /// Duration in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_duration_seconds: Option<i64>,
    /// When it was acquired (RFC 3339 with microseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acquire_time: Option<String>,
    /// When it was last renewed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<String>,
}

/// A Lease.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Lease {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: LeaseSpec,
}

/// Formats a time as a Kubernetes MicroTime (`2006-01-02T15:04:05.000000Z`).
pub fn micro_time(t: SystemTime) -> String {
    let dt = OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond()
    )
}

/// Parses an RFC 3339 time (MicroTime or Time).
pub fn parse_time(s: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok().map(SystemTime::from)
}

impl Lease {
    /// When the lease runs out: (renew time, or acquire time if never renewed) + duration. `None` when it has
    /// neither time nor duration (the reference then treats it as expired).
    pub fn expires_at(&self) -> Option<SystemTime> {
        let base = self.spec.renew_time.as_deref().or(self.spec.acquire_time.as_deref()).and_then(parse_time)?;
        let secs = u64::try_from(self.spec.lease_duration_seconds?).ok()?;
        Some(base + Duration::from_secs(secs))
    }

    /// Whether it has expired at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at().is_none_or(|t| t < now)
    }
}

fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, body: &[u8]) -> Result<T, KubeError> {
    serde_json::from_slice(body).map_err(|e| KubeError::Decode { what, cause: e.to_string() })
}

fn to_value(lease: &Lease) -> serde_json::Value {
    let mut v = serde_json::to_value(lease).unwrap_or_default();
    v["apiVersion"] = "coordination.k8s.io/v1".into();
    v["kind"] = "Lease".into();
    v
}

pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    pub(crate) fn leases_path(namespace: &str) -> String {
        format!("/apis/coordination.k8s.io/v1/namespaces/{}/leases", escape(namespace))
    }

    /// The lease, or `None` if it does not exist.
    pub async fn get_lease(&self, namespace: &str, name: &str) -> Result<Option<Lease>, KubeError> {
        match self.call(Method::GET, &format!("{}/{}", Self::leases_path(namespace), escape(name)), None).await {
            Ok(body) => decode("Lease", &body).map(Some),
            Err(e) if e.code() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a lease.
    pub async fn create_lease(&self, namespace: &str, lease: &Lease) -> Result<Lease, KubeError> {
        let body = self.call(Method::POST, &Self::leases_path(namespace), Some(&to_value(lease))).await?;
        decode("Lease", &body)
    }

    /// Replaces a lease (its resourceVersion is the precondition: 409 if it changed meanwhile).
    pub async fn replace_lease(&self, namespace: &str, lease: &Lease) -> Result<Lease, KubeError> {
        let path = format!("{}/{}", Self::leases_path(namespace), escape(&lease.metadata.name));
        let body = self.call(Method::PUT, &path, Some(&to_value(lease))).await?;
        decode("Lease", &body)
    }

    /// Deletes a lease, only if its resourceVersion is still `resource_version` when one is given. Returns the
    /// HTTP status (200 deleted, 404 already gone, 409 changed meanwhile, ...); transport failures are errors.
    pub async fn delete_lease(
        &self,
        namespace: &str,
        name: &str,
        resource_version: Option<&str>,
    ) -> Result<u16, KubeError> {
        let path = format!("{}/{}", Self::leases_path(namespace), escape(name));
        let body = resource_version.map(|rv| {
            serde_json::json!({"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"resourceVersion": rv}})
        });
        Ok(self.request(Method::DELETE, &path, body.as_ref()).await?.status)
    }

    /// Leases in `namespace` matching a label selector (`k=v,k2=v2`; empty for all). Returns the HTTP status
    /// with the list (empty unless 200).
    pub async fn list_leases(&self, namespace: &str, selector: &str) -> Result<(u16, Vec<Lease>), KubeError> {
        let mut path = Self::leases_path(namespace);
        if !selector.is_empty() {
            path.push_str("?labelSelector=");
            path.push_str(&escape(selector));
        }
        let resp = self.request(Method::GET, &path, None).await?;
        if resp.status != 200 {
            return Ok((resp.status, Vec::new()));
        }
        #[derive(Deserialize)]
        struct List {
            #[serde(default)]
            items: Vec<Lease>,
        }
        let list: List = decode("LeaseList", &resp.body)?;
        Ok((200, list.items))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_time_round_trips_and_expiry_follows_renew_then_acquire() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let s = micro_time(t);
        assert_eq!(s, "2023-11-14T22:13:20.123456Z");
        assert_eq!(parse_time(&s), Some(t));
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );

        let mut l = Lease::default();
        assert!(l.is_expired(t), "no times: expired");
        l.spec.lease_duration_seconds = Some(30);
        l.spec.acquire_time = Some(micro_time(t));
        assert!(!l.is_expired(t + Duration::from_secs(29)));
        assert!(l.is_expired(t + Duration::from_secs(31)));
        l.spec.renew_time = Some(micro_time(t + Duration::from_secs(20)));
        assert!(!l.is_expired(t + Duration::from_secs(49)));
        assert!(l.is_expired(t + Duration::from_secs(51)));
    }

    #[test]
    fn lease_json_shape() {
        let mut l = Lease::default();
        l.metadata.name = "konnectivity-proxy-server-a".into();
        l.metadata.labels.insert("k8s-app".into(), "konnectivity-server".into());
        l.spec.holder_identity = Some("a".into());
        l.spec.lease_duration_seconds = Some(30);
        let v = to_value(&l);
        assert_eq!(v["kind"], "Lease");
        assert_eq!(v["metadata"]["labels"]["k8s-app"], "konnectivity-server");
        assert_eq!(v["spec"]["holderIdentity"], "a");
        assert_eq!(v["spec"]["leaseDurationSeconds"], 30);
        assert!(v["metadata"].get("resourceVersion").is_none());
        assert_eq!(escape("k8s-app=konnectivity-server,a=b"), "k8s-app%3Dkonnectivity-server%2Ca%3Db");
    }
}
