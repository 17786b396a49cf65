//! Calico's number-or-string types: protocols, ports, AS numbers, and policy order.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// An IP protocol by name (`TCP`, `UDP`, `ICMP`, `ICMPv6`, `SCTP`, `UDPLite`) or number (1-255).
/// Kept as written; [`Protocol::number`] resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    Name(String),
    Number(i64),
}

impl Protocol {
    /// Protocol names Calico accepts (compared case-insensitively), with their numbers.
    pub const NAMES: &'static [(&'static str, u8)] = &[
        ("TCP", 6),
        ("UDP", 17),
        ("ICMP", 1),
        ("ICMPv6", 58),
        ("SCTP", 132),
        ("UDPLite", 136),
    ];

    /// The IP protocol number, or `None` for an unknown name or a number out of range.
    pub fn number(&self) -> Option<u8> {
        match self {
            Protocol::Number(n) => u8::try_from(*n).ok().filter(|n| *n >= 1),
            Protocol::Name(name) => Self::NAMES
                .iter()
                .find(|(known, _)| known.eq_ignore_ascii_case(name))
                .map(|(_, n)| *n),
        }
    }

    /// Whether the protocol has ports (TCP, UDP, SCTP, UDPLite).
    pub fn has_ports(&self) -> bool {
        matches!(self.number(), Some(6 | 17 | 132 | 136))
    }

    /// Whether this is ICMP (IPv4) or ICMPv6.
    pub fn is_icmp(&self) -> bool {
        matches!(self.number(), Some(1 | 58))
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Name(n) => f.write_str(n),
            Protocol::Number(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Protocol::Name(n) => s.serialize_str(n),
            Protocol::Number(n) => s.serialize_i64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => Protocol::Number(n),
            NumOrStr::Str(s) => match s.parse::<i64>() {
                Ok(n) => Protocol::Number(n),
                Err(_) => Protocol::Name(s),
            },
        })
    }
}

/// A port match: a number, an inclusive range `"min:max"`, or a named port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Port {
    Number(i64),
    /// Kept as written even when reversed, so validation can say so.
    Range(i64, i64),
    Named(String),
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Port::Number(n) => write!(f, "{n}"),
            Port::Range(a, b) => write!(f, "{a}:{b}"),
            Port::Named(n) => f.write_str(n),
        }
    }
}

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Port::Number(n) => s.serialize_i64(*n),
            other => s.collect_str(other),
        }
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => Port::Number(n),
            NumOrStr::Str(s) => {
                if let Ok(n) = s.parse::<i64>() {
                    Port::Number(n)
                } else if let Some((a, b)) = s
                    .split_once(':')
                    .and_then(|(a, b)| Some((a.parse::<i64>().ok()?, b.parse::<i64>().ok()?)))
                {
                    Port::Range(a, b)
                } else {
                    Port::Named(s)
                }
            }
        })
    }
}

/// A BGP AS number: an integer, or the dotted `high.low` form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AsNumber(pub u32);

impl fmt::Display for AsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for AsNumber {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl<'de> Deserialize<'de> for AsNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let invalid = |what: &str| {
            de::Error::custom(format!(
                "invalid AS number {what}: expected 0-4294967295 or the dotted form 0.0-65535.65535"
            ))
        };
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => u32::try_from(n)
                .map(AsNumber)
                .map_err(|_| invalid(&n.to_string())),
            NumOrStr::Str(s) => {
                if let Ok(n) = s.parse::<u32>() {
                    return Ok(AsNumber(n));
                }
                let (high, low) = s.split_once('.').ok_or_else(|| invalid(&s))?;
                let high: u16 = high.parse().map_err(|_| invalid(&s))?;
                let low: u16 = low.parse().map_err(|_| invalid(&s))?;
                Ok(AsNumber((u32::from(high) << 16) | u32::from(low)))
            }
        }
    }
}

/// A policy or tier order. Written back as an integer when it is one, as upstream does.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Deserialize)]
#[serde(transparent)]
pub struct Order(pub f64);

impl Serialize for Order {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        if v.fract() == 0.0 && v.abs() < 9.0e15 {
            s.serialize_i64(v as i64)
        } else {
            s.serialize_f64(v)
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "a number or a string")]
enum NumOrStr {
    Num(i64),
    Str(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_as_upstream() {
        let ports: Vec<Port> =
            serde_json::from_str(r#"[80, "443", "8000:8080", "http", "90:80"]"#).unwrap();
        assert_eq!(
            ports,
            [
                Port::Number(80),
                Port::Number(443),
                Port::Range(8000, 8080),
                Port::Named("http".into()),
                Port::Range(90, 80),
            ]
        );
        assert_eq!(
            serde_json::to_string(&ports).unwrap(),
            r#"[80,443,"8000:8080","http","90:80"]"#
        );
    }

    #[test]
    fn protocols_resolve_names_and_numbers() {
        let p: Vec<Protocol> = serde_json::from_str(r#"["TCP", "udp", 58, "132", "GRE"]"#).unwrap();
        let numbers: Vec<Option<u8>> = p.iter().map(Protocol::number).collect();
        assert_eq!(numbers, [Some(6), Some(17), Some(58), Some(132), None]);
        assert!(p[0].has_ports() && !p[2].has_ports() && p[2].is_icmp());
    }

    #[test]
    fn as_numbers_accept_plain_and_dotted() {
        let a: Vec<AsNumber> = serde_json::from_str(r#"[64512, "65000", "1.10"]"#).unwrap();
        assert_eq!(a, [AsNumber(64512), AsNumber(65000), AsNumber(65546)]);
        assert!(serde_json::from_str::<AsNumber>("-1").is_err());
        assert!(serde_json::from_str::<AsNumber>(r#""1.70000""#).is_err());
    }

    #[test]
    fn integral_orders_print_as_integers() {
        assert_eq!(serde_json::to_string(&Order(100.0)).unwrap(), "100");
        assert_eq!(serde_json::to_string(&Order(10.5)).unwrap(), "10.5");
    }
}
