//! Passing the arena's memfd to a local client over a Unix stream (`SCM_RIGHTS`, through the
//! `sendfd` crate). The daemon sends a small message with the fd attached once the client has
//! authenticated; the client receives both with [`recv_with_fd`].

use ferry_core::{Error, Result};
use sendfd::{RecvWithFd, SendWithFd};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Sends `bytes` (at least one) with `fd` attached to the first of them.
pub fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> Result<()> {
    if bytes.is_empty() {
        return Err(Error::InvalidArgument("an fd must travel with at least one byte on a stream socket".into()));
    }
    let sent = stream.send_with_fd(bytes, &[fd.as_raw_fd()]).map_err(|e| Error::io("sending the arena fd", &e))?;
    // The fd went with the first segment; the rest of the message follows as plain bytes.
    let mut rest = stream;
    rest.write_all(&bytes[sent..]).map_err(|e| Error::io("sending the arena fd message", &e))
}

/// Receives a message into `buf` (until it is full or the peer closes) and the fd sent with it,
/// if any; returns the bytes received and the fd (close-on-exec). A second fd is refused.
pub fn recv_with_fd(stream: &UnixStream, buf: &mut [u8]) -> Result<(usize, Option<OwnedFd>)> {
    let mut fd: Option<OwnedFd> = None;
    let mut got = 0;
    while got < buf.len() {
        let mut fds: [RawFd; 1] = [-1];
        let (n, nfds) = stream
            .recv_with_fd(&mut buf[got..], &mut fds)
            .map_err(|e| Error::io("receiving the arena fd message", &e))?;
        if nfds > 0 {
            // SAFETY: the kernel just installed this descriptor in our table for this message
            // (SCM_RIGHTS); nothing else knows it, so we are its only owner.
            let received = unsafe { OwnedFd::from_raw_fd(fds[0]) };
            // `try_clone` dups with F_DUPFD_CLOEXEC: sendfd receives without MSG_CMSG_CLOEXEC,
            // and the arena fd must not leak into programs the client executes.
            let cloexec = received.try_clone().map_err(|e| Error::io("duplicating the received arena fd", &e))?;
            if fd.replace(cloexec).is_some() {
                return Err(Error::Corrupt {
                    what: "arena fd message".into(),
                    message: "the peer sent more than one file descriptor".into(),
                });
            }
        }
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok((got, fd))
}

/// Reads exactly `buf.len()` bytes (no fd expected), for callers that read a reply after the
/// fd message with plain reads.
pub fn read_exact(stream: &UnixStream, buf: &mut [u8]) -> Result<()> {
    let mut stream = stream;
    stream.read_exact(buf).map_err(|e| Error::io("reading from the arena socket", &e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn passes_an_fd_with_a_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send_with_fd(&a, b"hello arena", file.as_fd()).unwrap();
        let mut buf = [0u8; 11];
        let (n, fd) = recv_with_fd(&b, &mut buf).unwrap();
        assert_eq!((n, &buf), (11, b"hello arena"));
        assert!(fd.is_some());
        assert!(send_with_fd(&a, b"", file.as_fd()).is_err());
        drop(a);
        let (n, fd) = recv_with_fd(&b, &mut buf).unwrap();
        assert_eq!(n, 0);
        assert!(fd.is_none());
    }

    #[test]
    fn refuses_a_second_fd() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send_with_fd(&a, b"x", file.as_fd()).unwrap();
        send_with_fd(&a, b"y", file.as_fd()).unwrap();
        let mut buf = [0u8; 2];
        assert!(matches!(recv_with_fd(&b, &mut buf), Err(Error::Corrupt { .. })));
        let mut plain = [0u8; 1];
        send_with_fd(&a, b"z", file.as_fd()).unwrap();
        read_exact(&b, &mut plain).unwrap();
        assert_eq!(&plain, b"z");
    }
}
