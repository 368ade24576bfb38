//! What one executor may take of the service: every limit in one place,
//! each with its default and its `serve` flag. Reaching one refuses the
//! request (or the connection) with a message that names the limit, and
//! writes a log line; it never costs another executor its replays.

use std::time::Duration;

use reprise_protocol::wire::MAX_FRAME;

/// The service's limits. `Default` is what `serve` uses unless told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// How long a request stream may take to deliver its request
    /// (`--request-timeout`).
    pub request_timeout: Duration,
    /// How long a relayed transfer may go without a byte from its holder
    /// (`--transfer-idle-timeout`).
    pub transfer_idle: Duration,
    /// Requests open at once on one connection (`--max-streams`); QUIC
    /// itself admits twice as many streams, so the excess is answered
    /// with an error instead of waiting unseen.
    pub streams_per_connection: u32,
    /// Connections of one identity at once (`--max-connections`).
    pub connections_per_identity: usize,
    /// Results one identity may have indexed, over all its connections
    /// (`--max-announced`).
    pub announced_per_identity: usize,
    /// Largest result relayed, output record and artifacts together
    /// (`--max-transfer`).
    pub max_transfer: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            request_timeout: Duration::from_secs(10),
            transfer_idle: Duration::from_secs(30),
            streams_per_connection: 16,
            connections_per_identity: 16,
            announced_per_identity: 20_000,
            max_transfer: 4 << 30,
        }
    }
}

impl Limits {
    /// The QUIC transport: a dead peer is noticed within ten seconds; no
    /// unidirectional streams (the protocol has none, and unaccepted ones
    /// would only buffer); bounded flow-control windows, so what one
    /// connection has in flight is bounded too.
    pub fn transport(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(10)).expect("in range"),
        ));
        t.keep_alive_interval(Some(Duration::from_secs(3)));
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(
            self.streams_per_connection.saturating_mul(2),
        ));
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
        t.stream_receive_window(quinn::VarInt::from_u32(WINDOW));
        t.receive_window(quinn::VarInt::from_u32(4 * WINDOW));
        t.send_window(u64::from(4 * WINDOW));
        reprise_frames::discover_mtu(&mut t);
        t
    }
}

/// A stream's and a quarter of a connection's flow-control window: room
/// for one control frame in flight.
const WINDOW: u32 = (MAX_FRAME as u32) + 64 * 1024;

/// Parses a size: bytes, or a number with `K`, `M`, `G` or `T` (powers of
/// 1024, an optional `iB`/`B` after).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (say 512M, 4G or a number of bytes)"))?;
    let shift = match unit.trim().trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(format!("{text:?} has an unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses a duration: seconds, or a number with `s`, `m` or `h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (say 10s, 2m or 1h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("{text:?} has an unknown unit (use s, m or h)")),
    };
    if secs == 0 {
        return Err("a timeout must be at least one second".into());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_with_their_units() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("2kB"), Ok(2048));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1d").is_err());
    }
}
