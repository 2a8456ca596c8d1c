//! Single values as the file writes them: durations with a unit, socket addresses, and
//! the checks that every table applies to its numbers and timeouts.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::Invalid;

/// A socket address written as a string: `"127.0.0.1:5432"` or `"[::1]:5432"`. Parsed
/// here rather than during deserialization so that an error inside a list points at
/// the element, not the list.
pub(super) fn address(value: &Spanned<String>) -> Result<SocketAddr, Invalid> {
    let text = value.get_ref();
    text.parse().map_err(|_| {
        let why = match port_out_of_range(text) {
            Some(port) => format!("port {port} is out of range (0 to 65535)"),
            None => "expected an IP address and port, like \"127.0.0.1:5432\" or \"[::1]:5432\""
                .to_string(),
        };
        (value.span(), format!("invalid address {text:?}: {why}"))
    })
}

/// The port of `text` if it is an IP address and a number too large for a port.
fn port_out_of_range(text: &str) -> Option<&str> {
    let (host, port) = text.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let is_number = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    (is_number && host.parse::<std::net::IpAddr>().is_ok() && port.parse::<u16>().is_err())
        .then_some(port)
}

/// A duration written as a string with a unit.
#[derive(Clone, Copy)]
pub(super) struct DurationValue(pub(super) Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(DurationValue)
            .ok_or_else(|| serde::de::Error::custom(format!(
                "invalid duration {s:?}: expected a whole number with a unit (ms, s, m, h, d), like \"250ms\", \"5s\" or \"1h\""
            )))
    }
}

/// Writes a duration back the way the config file would: `"250ms"`, `"5s"`, `"1h"`.
pub(super) fn duration_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    let ms = d.as_millis();
    let text = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ]
    .iter()
    .find(|(unit, _)| ms.is_multiple_of(*unit) && ms > 0)
    .map_or_else(
        || format!("{ms}ms"),
        |(unit, name)| format!("{}{name}", ms / unit),
    );
    s.serialize_str(&text)
}

pub(super) fn optional_duration_text<S: serde::Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => duration_text(d, s),
        None => s.serialize_none(),
    }
}

pub(super) fn bytes_text<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

/// Parses `"250ms"`, `"5s"`, `"10m"`, `"1h"`, `"2d"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let digits = s.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = s.split_at(digits);
    let n: u64 = number.parse().ok()?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit_ms).map(Duration::from_millis)
}

pub(super) fn at_least_one(value: &Spanned<u64>, key: &str) -> Result<u64, Invalid> {
    if *value.get_ref() == 0 {
        return Err((value.span(), format!("`{key}` must be at least 1")));
    }
    Ok(*value.get_ref())
}

pub(super) fn count(value: Option<Spanned<u32>>, default: u32, key: &str) -> Result<u32, Invalid> {
    match value {
        None => Ok(default),
        Some(v) if *v.get_ref() == 0 => Err((v.span(), format!("`{key}` must be at least 1"))),
        Some(v) => Ok(*v.get_ref()),
    }
}

/// Timeouts are always on: zero is refused rather than read as "never".
pub(super) fn positive(
    value: Option<Spanned<DurationValue>>,
    default: Duration,
    key: &str,
) -> Result<Duration, Invalid> {
    match value {
        None => Ok(default),
        Some(v) if v.get_ref().0.is_zero() => Err((
            v.span(),
            format!("`{key}` must be greater than zero: timeouts cannot be turned off"),
        )),
        Some(v) => Ok(v.get_ref().0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        for bad in [
            "",
            "5",
            "s",
            "5 s",
            "1.5s",
            "-1s",
            "5sec",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
