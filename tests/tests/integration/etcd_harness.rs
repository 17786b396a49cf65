//! The harness's etcd is a real server: a put is readable back, and it is gone after drop.

use etcd_client::Client;
use harness::{require, Etcd, Requirement};

#[tokio::test]
async fn put_then_get_on_a_real_etcd() -> anyhow::Result<()> {
    if !require("put_then_get_on_a_real_etcd", &[Requirement::Etcd]) {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let endpoint = etcd.endpoint();
    let mut client = Client::connect([endpoint.as_str()], None).await?;
    let key = "/calico/resources/v3/projectcalico.org/profiles/harness-check";
    client.put(key, "{\"kind\":\"Profile\"}", None).await?;
    let got = client.get(key, None).await?;
    let kv = got.kvs().first().expect("key just written is missing");
    assert_eq!(kv.value_str()?, "{\"kind\":\"Profile\"}");
    assert!(got.header().expect("etcd response header").revision() >= 2);
    drop(client);

    let addr = endpoint.trim_start_matches("http://").to_owned();
    drop(etcd);
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "etcd still listens on {addr} after the harness dropped it"
    );
    Ok(())
}
