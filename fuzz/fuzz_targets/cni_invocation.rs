//! A CNI call as a runtime (or an attacker who can write a network config) makes it: the
//! `CNI_*` environment and the configuration on stdin. Reading it never panics; whatever is
//! accepted yields names the kernel and the datastore accept; every error is valid CNI JSON.
//!
//! Input (what the seed corpus holds): `KEY=VALUE` lines, an empty line, then stdin.
#![no_main]

use std::collections::BTreeMap;

use calico_cni::{identity::Workload, protocol::CniResult, Invocation};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (env_text, stdin) = text.split_once("\n\n").unwrap_or((&text, ""));
    let env: BTreeMap<&str, &str> = env_text.lines().filter_map(|l| l.split_once('=')).collect();
    let lookup = |k: &str| env.get(k).map(|v| (*v).to_owned());
    let call = match Invocation::read(lookup, stdin.as_bytes()) {
        Ok(Invocation::Network(call)) => call,
        Ok(Invocation::Version(_)) => return,
        Err(e) => {
            let json: serde_json::Value =
                serde_json::from_str(&e.to_json("1.1.0")).expect("errors are JSON");
            assert!(json["code"].as_u64().is_some_and(|c| c > 0));
            return;
        }
    };
    let node = call.conf.nodename.clone().unwrap_or_else(|| "node1".into());
    let workload = Workload::new(
        &node,
        &call.env.container_id,
        &call.env.ifname,
        &call.env.args,
    );
    for veth in [workload.veth_name(), workload.alternate_veth_name()] {
        assert!(
            veth.len() <= 15 && veth.bytes().all(|b| b.is_ascii_graphic() && b != b'/'),
            "`{veth}` is no interface name"
        );
    }
    let _ = workload.endpoint_name();
    let _ = Workload::handle(&call.conf.name, &call.env.container_id);
    let _ = call.conf.etcd(lookup);
    let _ = call.conf.workload_labels();
    let _ = calico_cni::valid_attachments(&call.raw);
    if let Some(prev) = &call.conf.prev_result {
        if let Ok(result) = CniResult::from_value(prev) {
            let _ = result.to_json(&call.version);
        }
    }
});
