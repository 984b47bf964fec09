//! [`Mac`]: a unicast Ethernet address, the one type every layer uses.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A unicast, non-zero MAC address. Written and stored as
/// `aa:bb:cc:dd:ee:ff` (lowercase); built only through [`Mac::parse`] or
/// [`Mac::local`], so it is never multicast or all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac([u8; 6]);

impl Mac {
    /// Parses `aa:bb:cc:dd:ee:ff` (either case): six parts of exactly two
    /// hex digits, unicast, not all zero.
    pub fn parse(raw: &str) -> Result<Mac, String> {
        let parts: Vec<&str> = raw.split(':').collect();
        let bytes: Option<Vec<u8>> = parts
            .iter()
            .map(|p| {
                // Two hex digits exactly: from_str_radix alone takes "+f".
                if p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()) {
                    u8::from_str_radix(p, 16).ok()
                } else {
                    None
                }
            })
            .collect();
        let Some(b) = bytes.filter(|b| b.len() == 6) else {
            return Err(format!(
                "{raw:?} is not a MAC address like 02:00:00:00:00:01"
            ));
        };
        if b[0] & 1 == 1 {
            return Err(format!("{raw:?} is a multicast address"));
        }
        if b.iter().all(|x| *x == 0) {
            return Err(format!("{raw:?} is all zero"));
        }
        Ok(Mac([b[0], b[1], b[2], b[3], b[4], b[5]]))
    }

    /// A locally administered unicast address from any six bytes (the
    /// first byte's two low bits are set to "local, unicast").
    pub fn local(mut octets: [u8; 6]) -> Mac {
        octets[0] = (octets[0] | 0x02) & !0x01;
        Mac(octets)
    }

    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl TryFrom<String> for Mac {
    type Error = String;
    fn try_from(s: String) -> Result<Mac, String> {
        Mac::parse(&s)
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prints_and_refuses() {
        let m = Mac::parse("02:AB:00:01:02:ff").unwrap();
        assert_eq!(m.to_string(), "02:ab:00:01:02:ff");
        assert_eq!(m.octets(), [0x02, 0xab, 0, 1, 2, 0xff]);
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "zz:00:00:00:00:01",
            "02:00:00:00:00:+1",
            "+2:00:00:00:00:01",
            "2:00:00:00:00:001",
            "01:00:00:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert!(Mac::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Mac::local([0xff; 6]).to_string(), "fe:ff:ff:ff:ff:ff");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, "\"02:ab:00:01:02:ff\"");
        assert_eq!(serde_json::from_str::<Mac>(&json).unwrap(), m);
        assert!(serde_json::from_str::<Mac>("\"01:00:00:00:00:01\"").is_err());
    }
}
