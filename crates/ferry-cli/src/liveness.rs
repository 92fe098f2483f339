//! Rank 0's liveness, for online consumer ranks that run as separate processes
//! (`ferry consume --rank R --group ADDRESS`).
//!
//! A rank other than 0 that waits for its next optimizer step reads its inbox, which only rank
//! 0's ref distributor fills; the group's connection is read only at the step's collective. If
//! rank 0's process dies (a crash, a kill) while another rank waits on its inbox, nothing tells
//! that rank: it waits until its idle timeout, by default forever. SpecForge's launcher
//! (torchrun) tears the whole group down when one rank dies; these processes are launched one
//! by one, so rank 0 keeps one more connection open to every other rank for as long as it
//! lives, and each other rank watches its end ([`Link::watch`]): when it closes, the rank's
//! wait is ended with an error (the caller fails its inbox), and the rank's usual failure path
//! publishes `.consumer_failed`.
//!
//! The link is set up right after the group's rendezvous: rank 0 listens beside the group's
//! address (`<path>.rank0` for `unix://<path>`, an ephemeral port on the same host for `tcp://`)
//! and broadcasts where; every rank takes part in that broadcast, offline ranks too.

use anyhow::{Context, Result};
use ferry_control::collective::{Collective, GroupAddress};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// A rank's end of the link to rank 0 (ranks other than 0).
pub(crate) struct Link(Box<dyn Read + Send>);

/// The path of rank 0's liveness socket beside the group socket `path`.
fn beside(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".rank0");
    PathBuf::from(name)
}

/// The host part of `host:port` (`[v6]` brackets dropped).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Sets up the link, on every rank of `group` (a collective round): rank 0 listens and keeps
/// every connection open until its process ends, and returns `None`; the other ranks connect
/// and return their end.
pub(crate) fn establish(group: &dyn Collective, address: &GroupAddress) -> Result<Option<Link>> {
    let peers = group.world_size().saturating_sub(1);
    if group.rank() != 0 {
        let announced = group.broadcast_from_rank0(Vec::new()).context("learning where rank 0's liveness link is")?;
        let announced = String::from_utf8(announced).context("rank 0 announced its liveness link in non-UTF-8")?;
        let conn: Box<dyn Read + Send> = match address {
            GroupAddress::Unix(_) => Box::new(
                UnixStream::connect(&announced).with_context(|| format!("connecting to rank 0's link {announced}"))?,
            ),
            GroupAddress::Tcp(addr) => {
                let port: u16 = announced.parse().with_context(|| format!("rank 0 announced port {announced:?}"))?;
                let host = host_of(addr);
                Box::new(
                    TcpStream::connect((host, port))
                        .with_context(|| format!("connecting to rank 0's link at {host}:{port}"))?,
                )
            }
        };
        return Ok(Some(Link(conn)));
    }
    let announced = match address {
        GroupAddress::Unix(path) => {
            let path = beside(path);
            crate::consume::remove_stale_socket(&path)?;
            let listener =
                UnixListener::bind(&path).with_context(|| format!("listening for the ranks at {}", path.display()))?;
            let announced = path.display().to_string();
            spawn_holder("unix", move || {
                let conns: Vec<UnixStream> = listener.incoming().take(peers).filter_map(Result::ok).collect();
                // Every rank is connected: the file has done its job.
                let _ = std::fs::remove_file(&path);
                conns
            })?;
            announced
        }
        GroupAddress::Tcp(addr) => {
            let host = host_of(addr);
            let listener =
                TcpListener::bind((host, 0)).with_context(|| format!("listening for the ranks on {host}"))?;
            let port = listener.local_addr().context("the liveness listener's port")?.port();
            spawn_holder("tcp", move || {
                listener.incoming().take(peers).filter_map(Result::ok).collect::<Vec<TcpStream>>()
            })?;
            port.to_string()
        }
    };
    group.broadcast_from_rank0(announced.into_bytes()).context("announcing rank 0's liveness link")?;
    Ok(None)
}

/// Runs `accept` (which returns the accepted connections) on a detached thread that then holds
/// them until the process ends: their closing is what the other ranks watch for.
fn spawn_holder<T: Send + 'static>(kind: &str, accept: impl FnOnce() -> Vec<T> + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(format!("ferry-rank0-link-{kind}"))
        .spawn(move || {
            let _held = accept();
            loop {
                std::thread::park();
            }
        })
        .context("starting rank 0's liveness thread")?;
    Ok(())
}

impl Link {
    /// Watches the link on a detached thread: rank 0 never writes on it, so a read returns only
    /// when rank 0's process is gone; then `on_gone` runs.
    pub(crate) fn watch(self, on_gone: impl FnOnce() + Send + 'static) -> Result<()> {
        let Link(mut conn) = self;
        std::thread::Builder::new()
            .name("ferry-rank0-watch".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                on_gone();
            })
            .context("starting the watch on rank 0")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_sits_beside_the_group_address() {
        assert_eq!(beside(Path::new("/run/group.sock")), PathBuf::from("/run/group.sock.rank0"));
        assert_eq!(host_of("node0:29500"), "node0");
        assert_eq!(host_of("[::1]:29500"), "::1");
        assert_eq!(host_of("127.0.0.1:1"), "127.0.0.1");
    }
}
