//! The guest agent (qemu-ga) over its virtio-serial socket, driven with qapi.
//!
//! qapi has no timeouts, and after a timed-out call the connection is
//! unusable (the next call on it panics on a duplicate id), so every call
//! here has a deadline and a connection that missed one is thrown away. A
//! fresh connection first syncs with `guest-sync-delimited`, discarding
//! whatever a previous connection's late answers left in the channel.

use std::path::PathBuf;
use std::time::Duration;

use futures::Sink;
use qapi::futures::{QapiService, QgaStreamTokio};
use qapi::{Command, Execute, ExecuteError};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Why a guest agent call failed.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("the guest agent did not answer {command} within {after:?}")]
    Timeout {
        command: &'static str,
        after: Duration,
    },
    #[error("the guest agent refused {command}: {message}")]
    Refused {
        command: &'static str,
        message: String,
    },
    #[error("lost the connection to the guest agent during {command}")]
    Io {
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
}

type Writer = QgaStreamTokio<OwnedWriteHalf>;

struct Connection {
    service: QapiService<Writer>,
    events: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.events.abort();
    }
}

/// A guest agent reached through a unix socket.
pub struct Agent {
    socket: PathBuf,
    timeout: Duration,
    conn: Mutex<Option<Connection>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("socket", &self.socket)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Agent {
    /// An agent on `socket`; no connection is made until the first call.
    pub fn new(socket: PathBuf, timeout: Duration) -> Agent {
        Agent {
            socket,
            timeout,
            conn: Mutex::new(None),
        }
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one agent command with the default deadline.
    pub async fn call<C>(&self, command: C) -> Result<C::Ok, AgentError>
    where
        C: Command + qapi::qga::QgaCommand + Send + 'static,
        Writer: Sink<Execute<C, u32>, Error = std::io::Error> + Unpin,
    {
        self.call_within(command, self.timeout).await
    }

    /// Runs one agent command; a connection that misses the deadline is
    /// dropped, and the next call makes a new one.
    pub async fn call_within<C>(&self, command: C, deadline: Duration) -> Result<C::Ok, AgentError>
    where
        C: Command + qapi::qga::QgaCommand + Send + 'static,
        Writer: Sink<Execute<C, u32>, Error = std::io::Error> + Unpin,
    {
        let name = C::NAME;
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(self.connect(name, deadline).await?);
        }
        let conn = guard.as_ref().expect("connected above");
        match timeout(deadline, conn.service.execute(command)).await {
            Ok(Ok(ok)) => Ok(ok),
            Ok(Err(ExecuteError::Qapi(e))) => Err(AgentError::Refused {
                command: name,
                message: e.desc,
            }),
            Ok(Err(ExecuteError::Io(source))) => {
                *guard = None;
                Err(AgentError::Io {
                    command: name,
                    source,
                })
            }
            Err(_) => {
                *guard = None;
                Err(AgentError::Timeout {
                    command: name,
                    after: deadline,
                })
            }
        }
    }

    /// Drops the current connection, if any.
    pub async fn disconnect(&self) {
        *self.conn.lock().await = None;
    }

    async fn connect(
        &self,
        command: &'static str,
        deadline: Duration,
    ) -> Result<Connection, AgentError> {
        let io = |source| AgentError::Io { command, source };
        let sync = async {
            let stream = UnixStream::connect(&self.socket).await.map_err(io)?;
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let id = sync_id();
            let request =
                format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n");
            write.write_all(request.as_bytes()).await.map_err(io)?;
            // The agent writes 0xff just before its answer; anything before it
            // is stale output of an abandoned connection.
            let mut junk = Vec::new();
            read.read_until(0xff, &mut junk).await.map_err(io)?;
            let want = format!("{id}");
            loop {
                let mut line = String::new();
                if read.read_line(&mut line).await.map_err(io)? == 0 {
                    return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                let reply: serde_json::Value = match serde_json::from_str(line.trim()) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                if reply.get("return").map(|v| v.to_string()) == Some(want.clone()) {
                    break;
                }
            }
            Ok::<(BufReader<OwnedReadHalf>, OwnedWriteHalf), AgentError>((read, write))
        };
        let (read, write) = timeout(deadline, sync)
            .await
            .map_err(|_| AgentError::Timeout {
                command: "guest-sync-delimited",
                after: deadline,
            })??;
        let (service, events) = QgaStreamTokio::open_split(read, write).into_parts();
        let events = tokio::spawn(events.into_future());
        Ok(Connection { service, events })
    }
}

fn sync_id() -> i32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    ((nanos ^ std::process::id().rotate_left(16)) & 0x3fff_ffff) as i32
}
