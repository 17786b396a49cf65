//! Docker's calls, read and checked before the driver acts on any of them: a call is its path
//! (`/<Driver>.<Method>`) and a JSON body. Pure, so hostile bodies can be explored (the fuzz
//! target `docker_request` drives [`Request::parse`]).

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use crate::driver::DriverError;

/// One call of the NetworkDriver or IpamDriver protocol, with the fields the driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Activate,
    NetworkCapabilities,
    IpamCapabilities,
    DefaultAddressSpaces,
    RequestPool {
        /// `--subnet`, when given.
        pool: Option<IpNet>,
        v6: bool,
    },
    ReleasePool,
    RequestAddress {
        pool_id: String,
        /// `--ip`, when given.
        address: Option<IpAddr>,
    },
    ReleaseAddress {
        address: IpAddr,
    },
    CreateNetwork {
        network_id: String,
        v6: bool,
    },
    DeleteNetwork {
        network_id: String,
    },
    CreateEndpoint {
        network_id: String,
        endpoint_id: String,
        addresses: Vec<IpAddr>,
    },
    DeleteEndpoint {
        endpoint_id: String,
    },
    EndpointOperInfo,
    Join {
        endpoint_id: String,
    },
    /// Calls with nothing to do here (Leave, Discover*, *ExternalConnectivity).
    Acknowledge,
}

/// Docker's object IDs are 64 hex digits; the driver builds interface and endpoint names from
/// them, so anything that could not be such an ID is refused up front.
const MAX_ID: usize = 128;

impl Request {
    pub fn parse(call: &str, body: &[u8]) -> Result<Request, DriverError> {
        let malformed = |reason: String| DriverError::Malformed {
            call: call.to_owned(),
            reason,
        };
        let body: Value = if body.is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?
        };
        if !body.is_object() {
            return Err(malformed("the body is not a JSON object".into()));
        }
        let b = Body { call, value: &body };
        Ok(match call {
            "Plugin.Activate" => Request::Activate,
            "NetworkDriver.GetCapabilities" => Request::NetworkCapabilities,
            "IpamDriver.GetCapabilities" => Request::IpamCapabilities,
            "IpamDriver.GetDefaultAddressSpaces" => Request::DefaultAddressSpaces,
            "IpamDriver.RequestPool" => {
                if b.optional_str("SubPool")?.is_some_and(|s| !s.is_empty()) {
                    return Err(DriverError::Refused(
                        "calico IPAM does not support --ip-range (a sub pool); configure calico IP pools instead".into(),
                    ));
                }
                let pool = match b.optional_str("Pool")?.filter(|p| !p.is_empty()) {
                    None => None,
                    Some(p) => Some(p.parse::<IpNet>().map_err(|_| {
                        DriverError::Refused(format!("the requested subnet `{p}` is not a CIDR"))
                    })?),
                };
                Request::RequestPool {
                    pool,
                    v6: b.optional_bool("V6")?,
                }
            }
            "IpamDriver.ReleasePool" => Request::ReleasePool,
            "IpamDriver.RequestAddress" => {
                let gateway = body
                    .get("Options")
                    .and_then(|o| o.get("RequestAddressType"))
                    .and_then(Value::as_str)
                    == Some("com.docker.network.gateway");
                if gateway {
                    return Err(DriverError::Refused(
                        "calico IPAM does not support choosing a gateway".into(),
                    ));
                }
                Request::RequestAddress {
                    pool_id: b.string("PoolID")?.to_owned(),
                    address: match b.optional_str("Address")?.filter(|a| !a.is_empty()) {
                        None => None,
                        Some(a) => Some(b.address("Address", a)?),
                    },
                }
            }
            "IpamDriver.ReleaseAddress" => Request::ReleaseAddress {
                address: b.address("Address", b.string("Address")?)?,
            },
            "NetworkDriver.CreateNetwork" => Request::CreateNetwork {
                network_id: b.id("NetworkID")?,
                v6: body
                    .get("IPv6Data")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty()),
            },
            "NetworkDriver.DeleteNetwork" => Request::DeleteNetwork {
                network_id: b.id("NetworkID")?,
            },
            "NetworkDriver.CreateEndpoint" => {
                let mut addresses = Vec::new();
                if let Some(interface) = body.get("Interface").filter(|i| !i.is_null()) {
                    if !interface.is_object() {
                        return Err(malformed("field `Interface` is not an object".into()));
                    }
                    for key in ["Address", "AddressIPv6"] {
                        match interface.get(key) {
                            None | Some(Value::Null) => {}
                            Some(Value::String(a)) if a.is_empty() => {}
                            Some(Value::String(a)) => {
                                addresses.push(b.address(&format!("Interface.{key}"), a)?)
                            }
                            Some(_) => {
                                return Err(malformed(format!(
                                    "field `Interface.{key}` is not a string"
                                )))
                            }
                        }
                    }
                }
                Request::CreateEndpoint {
                    network_id: b.id("NetworkID")?,
                    endpoint_id: b.id("EndpointID")?,
                    addresses,
                }
            }
            "NetworkDriver.DeleteEndpoint" => Request::DeleteEndpoint {
                endpoint_id: b.id("EndpointID")?,
            },
            "NetworkDriver.EndpointOperInfo" => {
                b.id("EndpointID")?;
                Request::EndpointOperInfo
            }
            "NetworkDriver.Join" => {
                b.string("SandboxKey")?;
                Request::Join {
                    endpoint_id: b.id("EndpointID")?,
                }
            }
            "NetworkDriver.Leave"
            | "NetworkDriver.DiscoverNew"
            | "NetworkDriver.DiscoverDelete"
            | "NetworkDriver.ProgramExternalConnectivity"
            | "NetworkDriver.RevokeExternalConnectivity" => Request::Acknowledge,
            other => {
                let shown: String = other.chars().take(80).collect();
                return Err(DriverError::Refused(format!("unknown call `{shown}`")));
            }
        })
    }
}

/// A request body and the call it came with (for messages).
struct Body<'a> {
    call: &'a str,
    value: &'a Value,
}

impl<'a> Body<'a> {
    fn malformed(&self, reason: String) -> DriverError {
        DriverError::Malformed {
            call: self.call.to_owned(),
            reason,
        }
    }

    fn string(&self, name: &str) -> Result<&'a str, DriverError> {
        self.value
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| self.malformed(format!("field `{name}` is missing or not a string")))
    }

    fn optional_str(&self, name: &str) -> Result<Option<&'a str>, DriverError> {
        match self.value.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.malformed(format!("field `{name}` is not a string"))),
        }
    }

    fn optional_bool(&self, name: &str) -> Result<bool, DriverError> {
        match self.value.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(v)) => Ok(*v),
            Some(_) => Err(self.malformed(format!("field `{name}` is not a boolean"))),
        }
    }

    /// An object ID: ASCII letters and digits only, as Docker makes them.
    fn id(&self, name: &str) -> Result<String, DriverError> {
        let id = self.string(name)?;
        if id.is_empty() || id.len() > MAX_ID || !id.bytes().all(|c| c.is_ascii_alphanumeric()) {
            let shown: String = id.chars().take(80).collect();
            return Err(self.malformed(format!(
                "field `{name}` `{shown}` is not an ID (1 to {MAX_ID} ASCII letters and digits)"
            )));
        }
        Ok(id.to_owned())
    }

    /// An address as Docker writes it (`10.0.0.1` or `10.0.0.1/24`) in field `what`.
    fn address(&self, what: &str, text: &str) -> Result<IpAddr, DriverError> {
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let parsed: Option<IpAddr> = addr.parse().ok();
        let valid_len = |ip: &IpAddr| {
            len.is_none_or(|l| {
                l.parse::<u8>()
                    .is_ok_and(|l| l <= if ip.is_ipv4() { 32 } else { 128 })
            })
        };
        match parsed {
            Some(ip) if valid_len(&ip) => Ok(ip),
            _ => {
                let shown: String = text.chars().take(80).collect();
                Err(self.malformed(format!("{what} `{shown}` is not an address")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(call: &str, body: &str) -> Result<Request, String> {
        Request::parse(call, body.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn well_formed_calls_are_read() {
        assert_eq!(parse("Plugin.Activate", ""), Ok(Request::Activate));
        assert_eq!(
            parse(
                "IpamDriver.RequestPool",
                r#"{"Pool":"10.0.0.0/24","V6":false}"#
            ),
            Ok(Request::RequestPool {
                pool: Some("10.0.0.0/24".parse().unwrap()),
                v6: false
            })
        );
        assert_eq!(
            parse(
                "IpamDriver.RequestAddress",
                r#"{"PoolID":"CalicoPoolIPv4","Address":"10.0.0.7"}"#
            ),
            Ok(Request::RequestAddress {
                pool_id: "CalicoPoolIPv4".into(),
                address: Some("10.0.0.7".parse().unwrap())
            })
        );
        assert_eq!(
            parse(
                "NetworkDriver.CreateEndpoint",
                r#"{"NetworkID":"n1","EndpointID":"e1","Interface":{"Address":"10.0.0.7/32","AddressIPv6":""}}"#
            ),
            Ok(Request::CreateEndpoint {
                network_id: "n1".into(),
                endpoint_id: "e1".into(),
                addresses: vec!["10.0.0.7".parse().unwrap()]
            })
        );
    }

    #[test]
    fn bad_calls_are_refused_with_the_field_named() {
        for (call, body, expected) in [
            (
                "NetworkDriver.CreateEndpoint",
                "{not json",
                "malformed request body",
            ),
            ("NetworkDriver.CreateEndpoint", "[]", "not a JSON object"),
            (
                "NetworkDriver.DeleteEndpoint",
                r#"{"EndpointID":"../../x"}"#,
                "field `EndpointID`",
            ),
            (
                "NetworkDriver.DeleteEndpoint",
                r#"{"EndpointID":"ünïcode"}"#,
                "field `EndpointID`",
            ),
            (
                "NetworkDriver.DeleteEndpoint",
                r#"{"EndpointID":""}"#,
                "field `EndpointID`",
            ),
            (
                "NetworkDriver.DeleteEndpoint",
                r#"{"EndpointID":7}"#,
                "missing or not a string",
            ),
            (
                "IpamDriver.ReleaseAddress",
                r#"{"Address":"10.0.0.1/99"}"#,
                "is not an address",
            ),
            (
                "IpamDriver.RequestPool",
                r#"{"Pool":"nonsense"}"#,
                "not a CIDR",
            ),
            (
                "IpamDriver.RequestPool",
                r#"{"V6":"yes"}"#,
                "field `V6` is not a boolean",
            ),
            (
                "IpamDriver.RequestPool",
                r#"{"SubPool":"10.0.0.0/28"}"#,
                "sub pool",
            ),
            (
                "IpamDriver.RequestAddress",
                r#"{"PoolID":"p","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#,
                "gateway",
            ),
            (
                "NetworkDriver.CreateEndpoint",
                r#"{"NetworkID":"n","EndpointID":"e","Interface":{"Address":5}}"#,
                "Interface.Address",
            ),
            ("NetworkDriver.Nonsense", "", "unknown call"),
        ] {
            let err = parse(call, body).unwrap_err();
            assert!(err.contains(expected), "{call} {body}: {err}");
        }
    }
}
