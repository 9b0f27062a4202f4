//! Parsers for numbers and addresses from the command line: every value is checked here, so a
//! bad one is a one-line error (exit 1), never a panic further in.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Longest validity `--days` accepts (100 years): dates stay far inside what X.509 and the
/// `time` crate represent.
pub(crate) const MAX_DAYS: u32 = 36_500;

/// `--days`: a whole number of days, 1 to [`MAX_DAYS`].
pub(crate) fn days(s: &str) -> Result<u32, String> {
    let n: u32 = s.trim().parse().map_err(|_| format!("{s:?} is not a whole number of days"))?;
    if n == 0 || n > MAX_DAYS {
        return Err(format!("{n} days is out of range: give 1 to {MAX_DAYS}"));
    }
    Ok(n)
}

/// A duration in seconds (`--timeout 2.5`): finite, at least 1 ms, at most 30 days.
pub(crate) fn seconds(s: &str) -> Result<Duration, String> {
    const MAX: f64 = 30.0 * 24.0 * 3600.0;
    let x: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.001..=MAX).contains(&x) {
        return Err(format!("{s} seconds is out of range: give 0.001 to {MAX}"));
    }
    Ok(Duration::from_secs_f64(x))
}

/// Milliseconds (`--delay-ms`): at most one hour.
pub(crate) fn millis(s: &str) -> Result<Duration, String> {
    const MAX: u64 = 3_600_000;
    let n: u64 = s.trim().parse().map_err(|_| format!("{s:?} is not a whole number of milliseconds"))?;
    if n > MAX {
        return Err(format!("{n} ms is out of range: give 0 to {MAX}"));
    }
    Ok(Duration::from_millis(n))
}

/// A chance, 0 to 1 (`--loss 0.05`).
pub(crate) fn chance(s: &str) -> Result<f64, String> {
    let p: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=1.0).contains(&p) {
        return Err(format!("{s} is not a chance: give 0 to 1"));
    }
    Ok(p)
}

/// A UDP address as `IP:PORT` or `HOST:PORT` (`localhost:4433`), resolved now; of several
/// addresses, the first IPv4 one (quicseal's default listener is on 127.0.0.1).
pub(crate) fn address(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    if !s.contains(':') {
        return Err(format!("{s:?}: give HOST:PORT or IP:PORT, e.g. 127.0.0.1:4433"));
    }
    let all: Vec<SocketAddr> =
        s.to_socket_addrs().map_err(|e| format!("{s:?}: cannot resolve the host name: {e}"))?.collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| format!("{s:?}: the host name has no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_out_of_range_are_errors_not_panics() {
        assert_eq!(days("90"), Ok(90));
        for bad in ["0", "4000000", "-1", "1.5", "x", ""] {
            assert!(days(bad).is_err(), "{bad}");
        }
        assert_eq!(seconds("2.5"), Ok(Duration::from_millis(2500)));
        for bad in ["1e30", "1e-12", "0", "-1", "NaN", "inf", "x"] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
        assert!(millis("3600001").is_err() && millis("18446744073709551615").is_err());
        assert!(chance("1.5").is_err() && chance("NaN").is_err() && chance("0.5").is_ok());
    }

    #[test]
    fn addresses_take_host_names() {
        assert_eq!(address("127.0.0.1:4433").unwrap(), "127.0.0.1:4433".parse().unwrap());
        assert_eq!(address("[::1]:9").unwrap(), "[::1]:9".parse().unwrap());
        let local = address("localhost:4433").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 4433, "{local}");
        assert!(address("localhost").unwrap_err().contains("HOST:PORT"));
    }
}
