//! Serving the local store to peers through the orchestrator. What
//! serving checks: the request decodes (keys are typed: a path-like
//! key does not), the result is stored under that key, passed, sealed, of
//! the namespace asked, and of a namespace this executor's certificate
//! grants. Only such results are announced too (with the failed ones of
//! granted namespaces, sealed, so a disagreement shows). A result whose
//! record or artifact no longer matches its sha256 is quarantined, never
//! sent whole.

use std::path::PathBuf;

use quinn::{RecvStream, SendStream};
use reprise_frames::{ReadError, WriteError, read_message, write_chunk, write_message};
use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::wire::{ErrorCode, MAX_CHUNK, Message, Sealed};
use thiserror::Error;
use tracing::{debug, warn};

use crate::store::{Store, StoredResult};

/// The files whose bytes follow a transfer header, in order.
pub fn transfer_files(store: &Store, stored: &StoredResult) -> Vec<PathBuf> {
    std::iter::once(stored.output_path())
        .chain(stored.manifest.artifacts.iter().map(|a| store.blob_path(a)))
        .collect()
}

/// Writes a transfer: its header, then each file as chunk frames, each
/// hashed as it goes: a file that no longer matches its part's sha256
/// stops the transfer before its end ([`ServeError::Damaged`]), so the
/// asker never takes it.
pub async fn write_transfer(
    send: &mut SendStream,
    transfer: &Sealed,
    files: &[PathBuf],
) -> Result<(), ServeError> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    write_message(send, &Message::Transfer(Box::new(transfer.clone()))).await?;
    let mut buf = vec![0u8; MAX_CHUNK];
    for (i, (path, (_, _, sha256))) in files.iter().zip(transfer.parts()).enumerate() {
        if i > 0 {
            crate::faults::pause_point("serve");
        }
        let mut hasher = sha2::Sha256::new();
        let mut f = tokio::fs::File::open(path)
            .await
            .map_err(|source| ServeError::Io {
                path: path.clone(),
                source,
            })?;
        loop {
            let n = f.read(&mut buf).await.map_err(|source| ServeError::Io {
                path: path.clone(),
                source,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            write_chunk(send, &buf[..n]).await?;
        }
        if Sha256Digest::finish(hasher) != sha256 {
            return Err(ServeError::Damaged(path.clone()));
        }
    }
    Ok(())
}

/// Moves a result found damaged while serving aside, with a log line.
fn quarantine(store: &Store, result: &StoredResult, why: &str) {
    match store.quarantine(result, why) {
        Ok(dest) => warn!(
            key = %result.manifest.key,
            "a damaged stored result was quarantined in {}: {why}",
            dest.display()
        ),
        Err(e) => {
            warn!(key = %result.manifest.key, "a damaged stored result could not be quarantined: {e}")
        }
    }
}

/// Why serving a result to a peer failed.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("{} no longer matches its sha256 in the store", .0.display())]
    Damaged(PathBuf),
    #[error("reading {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(super) async fn serve_one(
    mut send: SendStream,
    mut recv: RecvStream,
    store: &Store,
    repos: &[String],
) -> Result<(), ServeError> {
    let (key, namespace) = match read_message(&mut recv).await {
        Ok(Message::Serve { key, namespace }) => (key, namespace),
        Ok(_) => {
            let m = Message::error(ErrorCode::Unexpected, "expected serve");
            write_message(&mut send, &m).await?;
            let _ = send.finish();
            return Ok(());
        }
        Err(e) => {
            // A path-like key or digest does not even decode.
            warn!("refused a request to serve that does not decode (a path for a key?): {e}");
            let m = Message::error(ErrorCode::Malformed, e.to_string());
            let _ = write_message(&mut send, &m).await;
            let _ = send.finish();
            return Err(e.into());
        }
    };
    let granted = repos.contains(&namespace);
    if !granted {
        warn!(key = %key.short(), "refused to serve: this certificate does not grant {namespace}");
    }
    let found = store
        .get(&key)
        .filter(|_| granted)
        .filter(|r| {
            let own = r.manifest.inputs.namespace == namespace;
            if !own {
                warn!(key = %key.short(), "refused to serve: the result belongs to {}, not {namespace}", r.manifest.inputs.namespace);
            }
            own
        })
        .filter(|r| match crate::replay::verify(r) {
            Ok(()) => true,
            Err(e) => {
                quarantine(store, r, &e.to_string());
                false
            }
        });
    let Some((stored, sealed)) = found.and_then(|r| r.sealed().map(|s| (r, s))) else {
        let m = Message::error(ErrorCode::NotFound, "the result is not held");
        write_message(&mut send, &m).await?;
        let _ = send.finish();
        return Ok(());
    };
    match write_transfer(&mut send, &sealed, &transfer_files(store, &stored)).await {
        Ok(()) => {
            let _ = send.finish();
            debug!(key = %key, "served a result");
            Ok(())
        }
        Err(ServeError::Damaged(path)) => {
            // Cut off: the asker must see a broken transfer, not a whole one.
            let _ = send.reset(quinn::VarInt::from_u32(1));
            quarantine(
                store,
                &stored,
                &format!("{} no longer matches its sha256", path.display()),
            );
            Err(ServeError::Damaged(path))
        }
        Err(e) => Err(e),
    }
}
