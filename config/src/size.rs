//! Byte sizes as people write them (`"64GiB"`, `"512MiB"`, `"4096B"`) and as the config prints
//! them.
//!
//! A size always carries its unit: `--pool-size 12` is far more likely a forgotten `GiB` than a
//! request for 12 bytes, so a bare number is refused rather than guessed at. Parsing is delegated
//! to `bytesize`; printing is our own so that the printed form parses back to exactly the same
//! number of bytes (bytesize's own display rounds to one decimal).

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Units tried when printing, largest first: binary and decimal, so both `"1GiB"` and `"64GB"`
/// print back the way they were most likely written.
const UNITS: [(&str, u64); 13] = [
    ("EiB", 1 << 60),
    ("EB", 1_000_000_000_000_000_000),
    ("PiB", 1 << 50),
    ("PB", 1_000_000_000_000_000),
    ("TiB", 1 << 40),
    ("TB", 1_000_000_000_000),
    ("GiB", 1 << 30),
    ("GB", 1_000_000_000),
    ("MiB", 1 << 20),
    ("MB", 1_000_000),
    ("KiB", 1 << 10),
    ("KB", 1_000),
    ("B", 1),
];

/// A number of bytes in the config: memory pools, frame limits, SSD capacity.
///
/// Accepts a number with a unit (`KiB`/`MiB`/`GiB`/`TiB` are powers of 1024, `KB`/`MB`/`GB`/`TB`
/// powers of 1000, `B` bytes); prints the shortest exact form, e.g. `"4GiB"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

impl Size {
    /// `n` KiB, for defaults and limits written in code.
    pub const fn kib(n: u64) -> Self {
        Size(n << 10)
    }

    /// `n` MiB, for defaults and limits written in code.
    pub const fn mib(n: u64) -> Self {
        Size(n << 20)
    }

    /// `n` GiB, for defaults and limits written in code.
    pub const fn gib(n: u64) -> Self {
        Size(n << 30)
    }

    /// The size in bytes, for the code that allocates.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0B");
        }
        // The unit giving the smallest whole number wins; "B" always divides, so one is found.
        let (unit, factor) = UNITS
            .iter()
            .filter(|(_, factor)| self.0 % factor == 0)
            .min_by_key(|(_, factor)| self.0 / factor)
            .copied()
            .unwrap_or(("B", 1));
        write!(f, "{}{unit}", self.0 / factor)
    }
}

/// Why a text is not a size; the config error says what was expected instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeParseError(String);

impl fmt::Display for SizeParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SizeParseError {}

impl FromStr for Size {
    type Err = SizeParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if !text.is_empty() && !text.chars().any(char::is_alphabetic) {
            return Err(SizeParseError(format!(
                "{text:?} has no unit; write e.g. \"{text}GiB\", or \"{text}B\" for bytes"
            )));
        }
        let parsed = bytesize::ByteSize::from_str(text).map_err(SizeParseError)?;
        // bytesize saturates on overflow; a size that large is a typo, not a request.
        if parsed.as_u64() == u64::MAX && text.parse::<u64>().is_err() {
            return Err(SizeParseError(format!("{text:?} does not fit in 64 bits")));
        }
        Ok(Size(parsed.as_u64()))
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// Takes a size from a string with a unit; an integer has no unit and is refused.
struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = Size;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size with a unit such as \"64GiB\" or \"4096B\"")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Size, E> {
        text.parse().map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_byte_counts() {
        assert_eq!("64GiB".parse(), Ok(Size::gib(64)));
        assert_eq!("512MiB".parse(), Ok(Size::mib(512)));
        assert_eq!("4 KiB".parse(), Ok(Size::kib(4)));
        assert_eq!("4096B".parse(), Ok(Size(4096)));
        assert_eq!("64GB".parse(), Ok(Size(64_000_000_000)));
        assert_eq!("0B".parse(), Ok(Size(0)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "12XB",
            "",
            "GiB",
            "-1",
            "lots",
            "99999999999EiB",
            "12",
            "4096",
            "1.5",
        ] {
            assert!(bad.parse::<Size>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn prints_shortest_exact_form_and_round_trips() {
        let cases = [
            (Size(0), "0B"),
            (Size::gib(4), "4GiB"),
            (Size::mib(8), "8MiB"),
            (Size::kib(4), "4KiB"),
            (Size(64_000_000_000), "64GB"),
            (Size(1_234_567), "1234567B"),
            (Size::mib(1536), "1536MiB"),
        ];
        for (size, text) in cases {
            assert_eq!(size.to_string(), text);
            assert_eq!(text.parse::<Size>(), Ok(size), "{text} does not round-trip");
        }
    }
}
