//! A call on the Docker driver's socket: its path and body. Reading it never panics, and the
//! names the driver would build from an accepted call are valid interface names.
//!
//! Input (what the seed corpus holds): the call (`NetworkDriver.CreateEndpoint`), a newline,
//! the JSON body.
#![no_main]

use calico_libnetwork::{driver::EndpointNames, request::Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let call = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or_default();
    let endpoint = match Request::parse(&call, body) {
        Ok(Request::CreateEndpoint { endpoint_id, .. })
        | Ok(Request::DeleteEndpoint { endpoint_id })
        | Ok(Request::Join { endpoint_id }) => endpoint_id,
        Ok(_) | Err(_) => return,
    };
    let names = EndpointNames::new("node1", "cali", &endpoint);
    for name in [&names.host_veth, &names.temp_veth] {
        assert!(
            name.len() <= 15 && name.bytes().all(|b| b.is_ascii_alphanumeric()),
            "`{name}` is no interface name"
        );
    }
});
