//! The executor's local socket, between `reprise run` (or `reprise daemon
//! status`) and a running `reprise daemon` of the same user and store: one
//! JSON line each way per connection, versioned, at most [`MAX_LINE`] bytes.

use serde::{Deserialize, Serialize};

use crate::digest::RunKey;

/// The version of this protocol; a daemon answers any other with an error.
pub const LOCAL_VERSION: u32 = 1;

/// The longest line either side reads.
pub const MAX_LINE: usize = 64 * 1024;

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub body: Ask,
}

/// What is asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Ask {
    /// A passed result was committed to the store at `store`: announce it
    /// to the orchestrator and serve it.
    Held {
        key: RunKey,
        namespace: String,
        store: String,
    },
    /// How the daemon is doing.
    Status,
    /// Lend this run the warm guest restored from the saved guest named
    /// `saved_guest`, if one is ready. A lent guest is the run's for as
    /// long as this connection stays open; the daemon kills it when the
    /// connection closes, and it serves no other run.
    Warm { saved_guest: String },
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Answer {
    /// The result is served (now, or as soon as the orchestrator is
    /// reachable again: every reconnection announces the whole store).
    Accepted {
        link: LinkState,
    },
    Status {
        pid: u32,
        store: String,
        orchestrator: String,
        link: LinkState,
        /// The warm guest, when the daemon keeps one (`--warm`): ready or
        /// being made, and its id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warm: Option<String>,
    },
    /// A warm guest lent to the run that asked: its qemu's pid, its work
    /// and sockets folders, the id written in the guest, its accelerator.
    Warm {
        pid: u32,
        work: String,
        sockets: String,
        guest: String,
        accel: String,
    },
    /// No warm guest for this run (none ready, or for another machine).
    NoWarm {
        why: String,
    },
    Error {
        message: String,
    },
}

/// The daemon's connection to the orchestrator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LinkState {
    /// Connected and serving as `identity`; `announced` results indexed.
    Connected { identity: String, announced: u32 },
    /// Not connected; the next attempt is under way or scheduled.
    Reconnecting { last_error: String },
}

/// Why a line could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("the line is longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("protocol version {0} is not supported (this reprise speaks {LOCAL_VERSION})")]
    Version(u32),
}

/// One line (with its newline) for `value`.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).expect("local messages serialise");
    line.push(b'\n');
    line
}

/// Decodes a request line, checking its length and version.
pub fn decode_request(line: &[u8]) -> Result<Request, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    // The version is read first, so a newer client gets a version error
    // rather than a confusing shape error.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned =
        serde_json::from_slice(line).map_err(|e| LineError::Malformed(e.to_string()))?;
    if v.version != LOCAL_VERSION {
        return Err(LineError::Version(v.version));
    }
    serde_json::from_slice(line).map_err(|e| LineError::Malformed(e.to_string()))
}

/// Decodes an answer line.
pub fn decode_answer(line: &[u8]) -> Result<Answer, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    serde_json::from_slice(line).map_err(|e| LineError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip() {
        let req = Request {
            version: LOCAL_VERSION,
            body: Ask::Held {
                key: crate::digest::Sha256Digest::of(b"k").hex().parse().unwrap(),
                namespace: "example.com/a/b".into(),
                store: "/s".into(),
            },
        };
        let line = encode(&req);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(decode_request(&line).unwrap(), req);
        let text = String::from_utf8(line).unwrap();
        assert!(text.starts_with(r#"{"version":1,"type":"held","#), "{text}");

        for answer in [
            Answer::Accepted {
                link: LinkState::Connected {
                    identity: "alice".into(),
                    announced: 3,
                },
            },
            Answer::Status {
                pid: 7,
                store: "/s".into(),
                orchestrator: "h:1".into(),
                link: LinkState::Reconnecting {
                    last_error: "refused".into(),
                },
                warm: Some("ready".into()),
            },
            Answer::Warm {
                pid: 9,
                work: "/w".into(),
                sockets: "/s".into(),
                guest: "g".into(),
                accel: "tcg".into(),
            },
            Answer::NoWarm { why: "none".into() },
            Answer::Error {
                message: "no".into(),
            },
        ] {
            assert_eq!(decode_answer(&encode(&answer)).unwrap(), answer);
        }
    }

    #[test]
    fn bad_lines_are_refused() {
        assert!(matches!(
            decode_request(br#"{"version":2,"type":"status"}"#),
            Err(LineError::Version(2))
        ));
        assert!(matches!(
            decode_request(br#"{"version":1,"type":"launch"}"#),
            Err(LineError::Malformed(_))
        ));
        assert!(matches!(
            decode_request(b"not json"),
            Err(LineError::Malformed(_))
        ));
        assert!(
            matches!(
                decode_request(
                    br#"{"version":1,"type":"held","key":"../../x","namespace":"n","store":"/s"}"#
                ),
                Err(LineError::Malformed(_))
            ),
            "a path-like key is refused"
        );
        let long = vec![b' '; MAX_LINE + 1];
        assert!(matches!(decode_request(&long), Err(LineError::TooLong)));
    }
}
