//! GET a URL in the cluster network through a proxy-server with hyper-util's legacy `Client`, dialing as the
//! `cluster` selection of a kube-apiserver EgressSelectorConfiguration says:
//!
//! ```text
//! cargo run -p konnectivity-client --features connector --example hyper_client -- egress.yaml http://10.0.0.5:8080/
//! ```
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use konnectivity_client::{EgressSelectorConfiguration, TunnelConnector};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let (Some(file), Some(url)) = (args.next(), args.next()) else {
        return Err("usage: hyper_client <egress-selector.yaml> <http://host:port/path>".into());
    };
    let config = EgressSelectorConfiguration::load(file.as_ref())?;
    let connector = TunnelConnector::new(config.cluster_dialer("hyper-client-example")?);
    // Each new pooled connection is one tunnel (or one CONNECT request) to the URL's host and port.
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let response = client.get(url.parse()?).await?;
    println!("{}", response.status());
    let body = response.into_body().collect().await?.to_bytes();
    println!("{}", String::from_utf8_lossy(&body));
    Ok(())
}
