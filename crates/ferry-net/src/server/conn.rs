//! One client connection: authentication, then requests served in order on the connection's
//! own thread, and on close the release of everything the client still held (leases, pins of
//! shared-memory views, uncommitted reservations) and, for a session that owns its puts, the
//! abort of every sample it put and did not disown.
//!
//! A request whose metadata is wrong gets an `ERROR` reply (its payload is skipped, so the
//! stream stays framed) and the connection goes on; a malformed frame (bad magic, version, op,
//! flags or length), a request before authentication, or a wrong secret closes that connection
//! only.
//!
//! With an arena, bytes never pass through a daemon buffer: a TCP put is read from the socket
//! straight into its reserved region, a TCP get is written from the region to the socket with
//! vectored writes, and on the shared-memory route the client copies (or borrows) them itself.

use super::Shared;
use crate::auth;
use crate::frame::{FrameHead, Header, Op, flags, read_head, write_head};
use crate::wire::{self, ErrorReply, GetReply, Placement, RefReply, Route, WireTensor};
use ferry_core::{
    Error, FeatureHandle, FeatureSpec, Generation, Result, SampleId, SampleRef, TensorView, ViewPlan, ViewSpec,
};
use ferry_shm::{PinId, Reservation};
use ferry_store::offline::raw_key;
use ferry_store::{DrainPolicy, PendingPut, TensorLayout};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// What a request handler tells the loop.
enum Next {
    Continue,
    Close,
}

/// A lease handed to this client, and the arena pin of its shared-memory view, if any.
struct HeldLease {
    handle: FeatureHandle,
    pin: Option<PinId>,
}

/// A shared-memory put the client is writing.
struct OpenPut<'a> {
    pending: PendingPut<'a>,
    reservation: Reservation,
}

pub(super) struct Connection<'a, S> {
    shared: &'a Shared,
    stream: S,
    /// A second handle on a Unix stream, to pass the arena's descriptor.
    fd_channel: Option<UnixStream>,
    transport: Route,
    peer: String,
    challenge: String,
    authed: bool,
    shm: bool,
    leases: HashMap<String, HeldLease>,
    puts: HashMap<u64, OpenPut<'a>>,
    next_put: u64,
    /// The session owns its puts (asked for at `Auth`).
    owns_puts: bool,
    /// The samples this session put and still owns, with the generation it put: aborted when
    /// the connection ends, unless disowned first.
    owned: HashMap<SampleId, Generation>,
    /// `owned` is pruned of samples freed meanwhile once it reaches this size.
    prune_owned_at: usize,
}

/// The smallest size at which a session's owned set is pruned of samples freed meanwhile (a
/// session that owns its puts and never disowns them, say one whose consumers free them, would
/// otherwise keep one entry per put until it ends).
const PRUNE_OWNED_AT: usize = 4096;

impl<'a, S: Read + Write> Connection<'a, S> {
    pub(super) fn new(
        shared: &'a Shared,
        stream: S,
        fd_channel: Option<UnixStream>,
        transport: Route,
        peer: String,
    ) -> Self {
        Connection {
            shared,
            stream,
            fd_channel,
            transport,
            peer,
            challenge: String::new(),
            authed: false,
            shm: false,
            leases: HashMap::new(),
            puts: HashMap::new(),
            next_put: 1,
            owns_puts: false,
            owned: HashMap::new(),
            prune_owned_at: PRUNE_OWNED_AT,
        }
    }

    pub(super) fn serve(&mut self) {
        if let Err(e) = self.greet() {
            tracing::debug!(peer = %self.peer, error = %e, "could not greet the client");
            return;
        }
        loop {
            let head = match read_head(&mut self.stream, &self.shared.limits) {
                Ok(Some(head)) => head,
                Ok(None) => return,
                Err(e) => {
                    if matches!(e, Error::Corrupt { .. }) {
                        self.shared.metrics.malformed_frame();
                    }
                    tracing::warn!(peer = %self.peer, error = %e, "closing the connection");
                    return;
                }
            };
            match self.handle(&head) {
                Ok(Next::Continue) => {}
                Ok(Next::Close) => return,
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "connection lost");
                    return;
                }
            }
        }
    }

    fn greet(&mut self) -> Result<()> {
        self.challenge = auth::nonce()?;
        let hello = wire::Hello {
            version: crate::frame::VERSION,
            store_id: self.shared.store.store_id().to_string(),
            max_payload: self.shared.limits.max_payload,
            challenge: self.challenge.clone(),
            auth_required: self.shared.secret.is_some(),
            shm: self.shared.arena.is_some() && self.fd_channel.is_some(),
        };
        self.send(Op::Hello, 0, 0, &hello, &[])
    }

    /// Serves one request. `Err` only for a broken connection; store errors become `ERROR`
    /// replies.
    fn handle(&mut self, head: &FrameHead) -> Result<Next> {
        let h = &head.header;
        if h.has(flags::REPLY) {
            return Err(Error::InvalidArgument(format!("the client sent a reply ({:?})", h.op)));
        }
        if !self.authed && !matches!(h.op, Op::Auth | Op::Bye) {
            self.skip_payload(h)?;
            let e = Error::AuthFailed { context: format!("{:?} before authenticating: send Auth first", h.op) };
            self.send_error(h, &e)?;
            return Ok(Next::Close);
        }
        let outcome = match h.op {
            Op::Auth => return self.authenticate(head),
            Op::Put => return self.put(head),
            Op::PutAlloc => return self.put_alloc(head),
            Op::PutCommit => self.put_commit(head),
            Op::Get => return self.get(head),
            Op::Release => self.release(head),
            Op::Abort => wire::decode::<wire::AbortRequest>(&head.meta, "Abort")
                .and_then(|req| {
                    let sid = SampleId::from(req.sample_id);
                    self.shared.store.abort(&sid)?;
                    self.owned.remove(&sid);
                    Ok(())
                })
                .and_then(|()| wire::encode(&serde_json::json!({}))),
            Op::AbortAll => self.shared.store.abort_all().and_then(|count| {
                self.owned.clear();
                wire::encode(&wire::CountReply { count: count as u64 })
            }),
            Op::Disown => self.disown(head),
            Op::Adopt => wire::decode::<wire::AdoptRequest>(&head.meta, "Adopt")
                .and_then(|req| self.shared.store.adopt(&req.r#ref))
                .and_then(|()| wire::encode(&serde_json::json!({}))),
            Op::Describe => wire::decode::<wire::GetRequest>(&head.meta, "Describe")
                .and_then(|req| self.shared.store.describe(&req.r#ref))
                .and_then(|specs| wire::encode(&specs)),
            Op::Gc => wire::encode(&self.shared.store.gc()),
            Op::Drain => self.drain(head),
            Op::TrackExternal => wire::decode::<wire::TrackExternalRequest>(&head.meta, "TrackExternal")
                .and_then(|req| {
                    let names: Vec<&str> = req.feature_names.iter().map(String::as_str).collect();
                    self.shared.store.track_external_attempt(
                        &req.sample_id.into(),
                        ferry_core::Generation::new(req.generation),
                        &names,
                    )
                })
                .and_then(|()| wire::encode(&serde_json::json!({}))),
            Op::DiscardExternal => self
                .shared
                .store
                .discard_external_attempts()
                .and_then(|count| wire::encode(&wire::CountReply { count: count as u64 })),
            Op::Health => {
                let mut health = self.shared.store.health();
                // Clients authenticate to the daemon, not to its store.
                health.auth_required |= self.shared.secret.is_some();
                wire::encode(&health)
            }
            Op::Ping => Ok(b"{}".to_vec()),
            Op::Bye => {
                self.skip_payload(h)?;
                self.send_raw(Op::Bye, h.request_id, flags::REPLY, b"{}", &[])?;
                return Ok(Next::Close);
            }
            Op::Hello => Err(Error::InvalidArgument("Hello is sent by the daemon, not to it".into())),
        };
        self.skip_payload(h)?;
        match outcome {
            Ok(meta) => self.send_raw(h.op, h.request_id, flags::REPLY, &meta, &[])?,
            Err(e) => self.send_error(h, &e)?,
        }
        Ok(Next::Continue)
    }

    fn authenticate(&mut self, head: &FrameHead) -> Result<Next> {
        let h = &head.header;
        self.skip_payload(h)?;
        let req = match wire::decode::<wire::AuthRequest>(&head.meta, "Auth") {
            Ok(req) => req,
            Err(e) => {
                self.send_error(h, &e)?;
                return Ok(Next::Close);
            }
        };
        let proof = match &self.shared.secret {
            None => None,
            Some(secret) => {
                let ok = match &req.response {
                    Some(response) => {
                        auth::verify_client(secret.expose(), &self.challenge, &req.client_nonce, response)?
                    }
                    None => false,
                };
                if !ok {
                    self.shared.metrics.auth_failure();
                    tracing::warn!(peer = %self.peer, "refused a connection: wrong or missing shared secret");
                    let e = Error::AuthFailed {
                        context: format!(
                            "ferry daemon ({}): the client's {} shared secret",
                            self.peer,
                            if req.response.is_some() { "wrong" } else { "missing" }
                        ),
                    };
                    self.send_error(h, &e)?;
                    return Ok(Next::Close);
                }
                Some(auth::daemon_proof(secret.expose(), &self.challenge, &req.client_nonce)?)
            }
        };
        self.authed = true;
        self.owns_puts = req.owned_puts;
        let grant = match (&self.shared.arena, &self.fd_channel) {
            (Some(arena), Some(_)) if req.want_shm => {
                Some(wire::ArenaGrant { capacity: arena.arena().capacity(), name: arena.arena().name().to_owned() })
            }
            _ => None,
        };
        let granted = grant.is_some();
        self.send(Op::Auth, h.request_id, flags::REPLY, &wire::AuthReply { proof, arena: grant }, &[])?;
        if granted && let (Some(arena), Some(channel)) = (&self.shared.arena, &self.fd_channel) {
            ferry_shm::fdpass::send_with_fd(channel, b"A", arena.arena().fd())?;
            self.shm = true;
        }
        Ok(Next::Continue)
    }

    /// Checks a put's metadata against its frame and returns the request.
    fn put_request(&self, head: &FrameHead, payload_len: u64) -> Result<wire::PutRequest> {
        let req = wire::decode::<wire::PutRequest>(&head.meta, "Put")?;
        let len = wire::payload_len(&req.tensors)?;
        if len != payload_len {
            return Err(Error::InvalidArgument(format!(
                "Put of {}: the tensors need {len} payload bytes but the frame carries {payload_len}",
                req.sample_id
            )));
        }
        Ok(req)
    }

    /// Admits a put and reserves its arena region (waiting until its deadline for room).
    fn reserve(&self, req: &wire::PutRequest) -> Result<OpenPut<'a>> {
        let shared: &'a Shared = self.shared;
        let arena = shared.arena.as_ref().ok_or_else(|| {
            Error::InvalidArgument("this daemon has no shared-memory arena; put over the socket".into())
        })?;
        let dtypes = req.tensors.iter().map(WireTensor::dtype).collect::<Result<Vec<_>>>()?;
        let layout: Vec<TensorLayout<'_>> = req
            .tensors
            .iter()
            .zip(&dtypes)
            .map(|(t, dtype)| TensorLayout { name: &t.name, dtype: *dtype, shape: &t.shape })
            .collect();
        let started = Instant::now();
        let deadline = req.wait_ms.map(|ms| started + Duration::from_millis(ms));
        let pending = shared.store.begin_put(req.sample_id.as_str().into(), &layout, req.metadata.clone(), deadline)?;
        let sizes = req.tensors.iter().map(|t| Ok((t.name.as_str(), t.nbytes()?))).collect::<Result<Vec<_>>>()?;
        let reservation = arena.reserve(pending.key(), &sizes, deadline)?;
        let waited = started.elapsed();
        // Only a put with a deadline can wait (one without fails at once when full); a slow
        // admission of one without (a loaded machine) is not a wait for room.
        if deadline.is_some() && waited > Duration::from_millis(1) {
            shared.metrics.admit_wait(waited);
        }
        Ok(OpenPut { pending, reservation })
    }

    /// Publishes a written reservation and commits it in the store.
    fn publish(&self, open: OpenPut<'a>) -> Result<SampleRef> {
        let arena = self.shared.arena.as_ref().ok_or_else(|| Error::InvalidArgument("no arena".into()))?;
        let OpenPut { pending, reservation } = open;
        arena.publish(reservation)?;
        Ok(pending.commit())
    }

    fn put(&mut self, head: &FrameHead) -> Result<Next> {
        let h = head.header;
        let request = self.put_request(head, h.payload_len);
        let request = match request {
            Ok(r) => r,
            Err(e) => return self.refuse_payload(&h, &e),
        };
        if self.shared.arena.is_none() {
            return self.put_staged(&h, &request);
        }
        let open = match self.reserve(&request) {
            Ok(open) => open,
            Err(e) => return self.refuse_payload(&h, &e),
        };
        // The payload goes from the socket straight into the reserved region; on a broken
        // connection the reservation and the admitted bytes are returned as `open` drops.
        let arena = self.shared.arena.as_ref().ok_or_else(|| Error::InvalidArgument("no arena".into()))?;
        for placed in open.reservation.objects() {
            arena.arena().fill_from(placed.offset, placed.len, &mut self.stream)?;
        }
        let outcome = self.publish(open).and_then(|r| {
            self.own(&r);
            wire::encode(&RefReply { r#ref: r, route: self.transport })
        });
        match outcome {
            Ok(meta) => {
                self.shared.metrics.put(self.transport, h.payload_len);
                self.send_raw(Op::Put, h.request_id, flags::REPLY, &meta, &[])?;
            }
            Err(e) => self.send_error(&h, &e)?,
        }
        Ok(Next::Continue)
    }

    /// A put without an arena: the payload is read into a pooled staging buffer, then the
    /// store copies it into its backend.
    fn put_staged(&mut self, h: &Header, request: &wire::PutRequest) -> Result<Next> {
        let len = usize::try_from(h.payload_len).map_err(|_| Error::InvalidArgument("payload too large".into()))?;
        let Some(mut buf) = self.shared.staging.try_take(len) else {
            let e = Error::InvalidArgument(format!("cannot stage a {len}-byte put: memory is exhausted"));
            return self.refuse_payload(h, &e);
        };
        self.stream
            .read_exact(buf.as_mut_slice())
            .map_err(|e| Error::io(format!("reading a payload from {}", self.peer), &e))?;
        let started = Instant::now();
        let outcome = stage_views(&request.tensors, &buf).and_then(|views| match request.wait_ms {
            Some(ms) => self.shared.store.put_until(
                request.sample_id.as_str(),
                &views,
                request.metadata.clone(),
                started + Duration::from_millis(ms),
            ),
            None => self.shared.store.put(request.sample_id.as_str(), &views, request.metadata.clone()),
        });
        let outcome = outcome.and_then(|r| {
            self.own(&r);
            wire::encode(&RefReply { r#ref: r, route: self.transport })
        });
        match outcome {
            Ok(meta) => {
                self.shared.metrics.put(self.transport, h.payload_len);
                self.send_raw(Op::Put, h.request_id, flags::REPLY, &meta, &[])?;
            }
            Err(e) => self.send_error(h, &e)?,
        }
        Ok(Next::Continue)
    }

    fn put_alloc(&mut self, head: &FrameHead) -> Result<Next> {
        let h = head.header;
        self.skip_payload(&h)?;
        let outcome = (|| {
            if !self.shm {
                return Err(Error::InvalidArgument(
                    "PutAlloc needs the shared-memory route: connect over the Unix socket and ask for the arena".into(),
                ));
            }
            if self.puts.len() >= self.shared.max_pending_puts {
                return Err(Error::InvalidArgument(format!(
                    "this connection already holds {} uncommitted puts (the limit); commit or cancel some",
                    self.puts.len()
                )));
            }
            let request = wire::decode::<wire::PutRequest>(&head.meta, "PutAlloc")?;
            wire::payload_len(&request.tensors)?; // sizes must not overflow
            let open = self.reserve(&request)?;
            let placements =
                open.reservation.objects().iter().map(|p| Placement { offset: p.offset, len: p.len }).collect();
            let put_id = self.next_put;
            self.next_put += 1;
            self.puts.insert(put_id, open);
            wire::encode(&wire::PutAllocReply { put_id, placements })
        })();
        match outcome {
            Ok(meta) => self.send_raw(Op::PutAlloc, h.request_id, flags::REPLY | flags::SHM, &meta, &[])?,
            Err(e) => self.send_error(&h, &e)?,
        }
        Ok(Next::Continue)
    }

    fn put_commit(&mut self, head: &FrameHead) -> Result<Vec<u8>> {
        let req = wire::decode::<wire::PutCommitRequest>(&head.meta, "PutCommit")?;
        let open = self.puts.remove(&req.put_id).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "PutCommit of unknown put_id {} (committed, cancelled or never allocated)",
                req.put_id
            ))
        })?;
        if req.cancel {
            return Ok(b"{}".to_vec()); // dropping `open` frees the region and the admitted bytes
        }
        let bytes = open.pending.nbytes();
        let r = self.publish(open)?;
        self.own(&r);
        self.shared.metrics.put(Route::Shm, bytes);
        wire::encode(&RefReply { r#ref: r, route: Route::Shm })
    }

    fn get(&mut self, head: &FrameHead) -> Result<Next> {
        let h = head.header;
        self.skip_payload(&h)?;
        let req = match wire::decode::<wire::GetRequest>(&head.meta, "Get") {
            Ok(req) => req,
            Err(e) => {
                self.send_error(&h, &e)?;
                return Ok(Next::Continue);
            }
        };
        if self.leases.len() >= self.shared.max_leases {
            let e = Error::InvalidArgument(format!(
                "this connection holds {} read leases (the limit); release some",
                self.leases.len()
            ));
            self.send_error(&h, &e)?;
            return Ok(Next::Continue);
        }
        if self.shared.arena.is_some() && req.r#ref.scheme() != Some("file") {
            return self.get_located(&h, &req);
        }
        let names: Option<Vec<&str>> = req.names.as_ref().map(|n| n.iter().map(String::as_str).collect());
        // Views are planned against the ref's specs (a view needs them) before the lease; the
        // store returns tensors shaped by those specs.
        let planned = match &req.views {
            Some(views) => match wanted_features(&req.r#ref, req.names.as_deref(), Some(views)) {
                Ok(wanted) => wanted,
                Err(e) => {
                    self.send_error(&h, &e)?;
                    return Ok(Next::Continue);
                }
            },
            None => Vec::new(),
        };
        let (tensors, handle) = match self.shared.store.get(&req.r#ref, names.as_deref()) {
            Ok(ok) => ok,
            Err(e) => {
                self.send_error(&h, &e)?;
                return Ok(Next::Continue);
            }
        };
        let mut wires = Vec::with_capacity(tensors.len());
        let mut parts = Vec::with_capacity(tensors.len());
        for (name, t) in &tensors {
            let plan = planned.iter().find(|w| w.wire.name == *name).and_then(|w| w.plan.as_ref());
            match PayloadPart::of(t.bytes(), plan) {
                Ok(part) => parts.push(part),
                Err(e) => {
                    // The tensor does not hold the bytes its spec says: give the lease back.
                    let _ = self.shared.store.release(&handle);
                    self.send_error(&h, &e)?;
                    return Ok(Next::Continue);
                }
            }
            let mut wire = WireTensor::of(name, &t.view());
            if let Some(plan) = plan {
                wire.shape = plan.shape.clone();
            }
            wires.push(wire);
        }
        let reply = GetReply { handle: handle.clone(), tensors: wires, route: self.transport, placements: None };
        let bytes = parts.iter().map(PayloadPart::len).sum();
        self.send_lease(&h, &reply, &parts, None, bytes)
    }

    /// A get from the arena: the lease is taken with every check of the lifecycle core, and the
    /// objects are located and pinned under it. Over the shared-memory route the reply carries
    /// their placements and the pin lasts until the lease is released; otherwise the bytes go
    /// from the arena to the socket and the pin ends with the write.
    fn get_located(&mut self, h: &Header, req: &wire::GetRequest) -> Result<Next> {
        let arena = self.shared.arena.as_ref().ok_or_else(|| Error::InvalidArgument("no arena".into()))?;
        let r = &req.r#ref;
        let prepared = wanted_features(r, req.names.as_deref(), req.views.as_ref());
        let outcome = prepared.and_then(|wanted| {
            let objects: Vec<&str> = wanted.iter().map(|w| w.object).collect();
            self.shared
                .store
                .lease_with(r, |key| {
                    let located = arena.locate(key, &objects)?;
                    let sizes = located.objects.iter().map(|p| p.len);
                    let checked = wanted.iter().zip(sizes).try_for_each(|(w, held)| {
                        check_object_len(|| key.object(w.object).to_string(), held, w.nbytes)
                    });
                    match checked {
                        Ok(()) => Ok(located),
                        Err(e) => {
                            unpin(arena, located.pin);
                            Err(e)
                        }
                    }
                })
                .map(|(located, handle)| (wanted, located, handle))
        });
        let (wanted, located, handle) = match outcome {
            Ok(ok) => ok,
            Err(e) => {
                self.send_error(h, &e)?;
                return Ok(Next::Continue);
            }
        };
        let tensors: Vec<WireTensor> = wanted.iter().map(|w| w.wire.clone()).collect();
        let bytes = wanted.iter().zip(&located.objects).map(|(w, p)| w.plan.as_ref().map_or(p.len, |v| v.nbytes)).sum();
        if self.shm && req.shm {
            let placements = located.objects.iter().map(|p| Placement { offset: p.offset, len: p.len }).collect();
            let reply = GetReply { handle, tensors, route: Route::Shm, placements: Some(placements) };
            return self.send_lease(h, &reply, &[], Some(located.pin), bytes);
        }
        let reply = GetReply { handle, tensors, route: self.transport, placements: None };
        // A view goes as its ranges of the object, straight from the arena (or gathered, when
        // its ranges are short: see `PayloadPart`).
        let parts: Result<Vec<PayloadPart<'_>>> = wanted
            .iter()
            .zip(&located.objects)
            .map(|(w, p)| PayloadPart::of(arena.arena().slice(p.offset, to_usize(p.len)?)?, w.plan.as_ref()))
            .collect();
        let sent = match parts {
            Ok(parts) => self.send_lease(h, &reply, &parts, None, bytes),
            Err(e) => {
                let _ = self.shared.store.release(&reply.handle);
                self.send_error(h, &e).map(|()| Next::Continue)
            }
        };
        unpin(arena, located.pin);
        sent
    }

    /// Sends a get's reply and records its lease (and pin) as this connection's; a lease the
    /// client never received is released here.
    fn send_lease(
        &mut self,
        h: &Header,
        reply: &GetReply,
        payload: &[PayloadPart<'_>],
        pin: Option<PinId>,
        bytes: u64,
    ) -> Result<Next> {
        let meta = wire::encode(reply)?;
        let handle = reply.handle.clone();
        self.leases.insert(handle.lease_token.to_string(), HeldLease { handle: handle.clone(), pin });
        let flags = if reply.route == Route::Shm { flags::REPLY | flags::SHM } else { flags::REPLY };
        let sent = if payload.iter().any(|p| matches!(p, PayloadPart::Gather(..))) {
            self.send_parts(Op::Get, h.request_id, flags, &meta, payload)
        } else {
            // The common case: one vectored write of header, metadata and every slice.
            let slices: Vec<&[u8]> = payload
                .iter()
                .flat_map(|p| match p {
                    PayloadPart::Slices(s) => s.as_slice(),
                    PayloadPart::Gather(..) => &[],
                })
                .copied()
                .collect();
            self.send_raw(Op::Get, h.request_id, flags, &meta, &slices)
        };
        if let Err(e) = sent {
            self.drop_lease(handle.lease_token.as_str());
            return Err(e);
        }
        self.shared.metrics.get(reply.route, bytes);
        Ok(Next::Continue)
    }

    fn release(&mut self, head: &FrameHead) -> Result<Vec<u8>> {
        let req = wire::decode::<wire::ReleaseRequest>(&head.meta, "Release")?;
        let held = self.leases.remove(req.handle.lease_token.as_str());
        let released = self.shared.store.release(&req.handle);
        // The pin goes after the release: a free the release triggers waits for it.
        if let (Some(HeldLease { pin: Some(pin), .. }), Some(arena)) = (held, &self.shared.arena) {
            unpin(arena, pin);
        }
        released?;
        Ok(b"{}".to_vec())
    }

    fn drop_lease(&mut self, token: &str) {
        if let Some(held) = self.leases.remove(token) {
            if let Err(e) = self.shared.store.release(&held.handle) {
                tracing::warn!(peer = %self.peer, error = %e, "releasing a disconnected client's lease");
            }
            if let (Some(pin), Some(arena)) = (held.pin, &self.shared.arena) {
                unpin(arena, pin);
            }
        }
    }

    fn drain(&mut self, head: &FrameHead) -> Result<Vec<u8>> {
        let req = wire::decode::<wire::DrainRequest>(&head.meta, "Drain")?;
        let policy = DrainPolicy {
            max_attempts: req.max_attempts,
            retry_interval: Duration::from_millis(req.retry_interval_ms),
        };
        let report = match req.sample_ids {
            Some(ids) => {
                let ids: Vec<ferry_core::SampleId> = ids.into_iter().map(Into::into).collect();
                self.shared.store.drain_samples(&ids, policy)?
            }
            None => self.shared.store.drain(policy)?,
        };
        wire::encode(&report)
    }

    /// Records a committed put as this session's, if it owns its puts (a newer put of the same
    /// id replaces the older generation, which the put itself superseded).
    fn own(&mut self, r: &SampleRef) {
        if !self.owns_puts {
            return;
        }
        let Some(generation) = r.generation() else {
            // Every ref the lifecycle core builds carries its generation.
            tracing::warn!(peer = %self.peer, sample = %r.sample_id, "a put's ref has no generation; not owned");
            return;
        };
        self.owned.insert(r.sample_id.clone(), generation);
        if self.owned.len() >= self.prune_owned_at {
            let store = &self.shared.store;
            self.owned.retain(|sid, generation| store.live_generation(sid) == Some(*generation));
            self.prune_owned_at = (self.owned.len() * 2).max(PRUNE_OWNED_AT);
        }
    }

    /// `Disown`: the session stops owning the samples (they now live until deleted like any
    /// other). An id the session does not own is fine if the sample exists; one the store does
    /// not hold live is `NotFound`, after every other id was handled. Replies how many of the
    /// ids the session owned.
    fn disown(&mut self, head: &FrameHead) -> Result<Vec<u8>> {
        let req = wire::decode::<wire::DisownRequest>(&head.meta, "Disown")?;
        let mut count = 0u64;
        let mut missing = Vec::new();
        for sid in req.sample_ids {
            let sid = SampleId::from(sid);
            let owned = self.owned.remove(&sid);
            match self.shared.store.live_generation(&sid) {
                None => missing.push(sid.to_string()),
                Some(live) if owned == Some(live) => count += 1,
                Some(_) => {}
            }
        }
        if !missing.is_empty() {
            let shown = missing.iter().take(8).map(String::as_str).collect::<Vec<_>>().join(", ");
            let more = if missing.len() > 8 { format!(" and {} more", missing.len() - 8) } else { String::new() };
            return Err(Error::NotFound {
                what: format!("sample(s) {shown}{more} to disown (freed, or never put in this daemon's store)"),
            });
        }
        wire::encode(&wire::CountReply { count })
    }

    /// Releases everything this connection still holds (the client closed or died): leases
    /// and their pins, and uncommitted reservations; then, for a session that owns its puts,
    /// aborts every sample it still owns (only the generation it put: a newer put of the same
    /// id by anyone else stays). A removal that fails is parked as pending by the lifecycle
    /// core, as any abort's.
    pub(super) fn close(&mut self) {
        let tokens: Vec<String> = self.leases.keys().cloned().collect();
        for token in tokens {
            self.drop_lease(&token);
        }
        self.puts.clear();
        let mut freed = 0u64;
        for (sid, generation) in self.owned.drain() {
            match self.shared.store.abort_generation(&sid, generation) {
                Ok(true) => freed += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(peer = %self.peer, sample = %sid, error = %e, "freeing an ended session's sample")
                }
            }
        }
        if freed > 0 {
            self.shared.metrics.orphans_freed(freed);
            tracing::info!(peer = %self.peer, samples = freed, "freed the samples an ended session still owned");
        }
    }

    /// Answers an error to a request whose payload is still in the stream.
    fn refuse_payload(&mut self, h: &Header, e: &Error) -> Result<Next> {
        self.skip_payload(h)?;
        self.send_error(h, e)?;
        Ok(Next::Continue)
    }

    /// Reads and drops a payload the request did not use, keeping the stream framed.
    fn skip_payload(&mut self, h: &Header) -> Result<()> {
        if h.payload_len == 0 {
            return Ok(());
        }
        let copied = io::copy(&mut (&mut self.stream).take(h.payload_len), &mut io::sink())
            .map_err(|e| Error::io(format!("skipping a payload from {}", self.peer), &e))?;
        if copied != h.payload_len {
            return Err(Error::io(
                format!("skipping a payload from {}", self.peer),
                &io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside a payload"),
            ));
        }
        Ok(())
    }

    fn send<T: serde::Serialize>(
        &mut self,
        op: Op,
        request_id: u64,
        flags: u32,
        meta: &T,
        payload: &[&[u8]],
    ) -> Result<()> {
        let meta = wire::encode(meta)?;
        self.send_raw(op, request_id, flags, &meta, payload)
    }

    fn send_raw(&mut self, op: Op, request_id: u64, flags: u32, meta: &[u8], payload: &[&[u8]]) -> Result<()> {
        let meta_len =
            u32::try_from(meta.len()).map_err(|_| Error::InvalidArgument("reply metadata too large".into()))?;
        let payload_len = payload.iter().map(|p| p.len() as u64).sum();
        let header = Header { op, flags, request_id, meta_len, payload_len };
        write_head(&mut self.stream, &header, meta, payload)
    }

    /// A frame whose payload is written part by part (see [`write_parts`]).
    fn send_parts(
        &mut self,
        op: Op,
        request_id: u64,
        flags: u32,
        meta: &[u8],
        parts: &[PayloadPart<'_>],
    ) -> Result<()> {
        let meta_len =
            u32::try_from(meta.len()).map_err(|_| Error::InvalidArgument("reply metadata too large".into()))?;
        let payload_len = parts.iter().map(PayloadPart::len).sum();
        let header = Header { op, flags, request_id, meta_len, payload_len };
        crate::frame::write_head_only(&mut self.stream, &header, meta)?;
        write_parts(&mut self.stream, parts)
    }

    fn send_error(&mut self, h: &Header, error: &Error) -> Result<()> {
        self.shared.metrics.error(error);
        self.send(h.op, h.request_id, flags::REPLY | flags::ERROR, &ErrorReply::of(error), &[])
    }
}

/// Ranges of a view shorter than this are gathered through a small buffer instead of each
/// going as its own I/O vector: a view of one-byte ranges would otherwise need sixteen bytes of
/// vector (and a kernel iteration) per byte of view. Longer ranges go straight from the arena.
const MIN_DIRECT_RUN: u64 = 512;

/// The buffer short ranges are gathered through, and so the most a gathered view costs the
/// daemon in memory whatever its size.
const GATHER_CHUNK: usize = 1 << 20;

/// One feature's part of a get's payload: slices of bytes the daemon holds (the whole object,
/// or a view's long ranges of it), or a view of short ranges to gather while writing.
enum PayloadPart<'a> {
    Slices(Vec<&'a [u8]>),
    Gather(ViewPlan, &'a [u8]),
}

impl<'a> PayloadPart<'a> {
    /// The part for `object` (a feature's bytes) under `plan`, if any.
    fn of(object: &'a [u8], plan: Option<&ViewPlan>) -> Result<PayloadPart<'a>> {
        match plan {
            None => Ok(PayloadPart::Slices(vec![object])),
            Some(plan) if plan.runs <= 1 || plan.run >= MIN_DIRECT_RUN => Ok(PayloadPart::Slices(plan.slices(object)?)),
            Some(plan) => {
                if plan.canonical_extent() > object.len() as u64 {
                    return Err(Error::Corrupt {
                        what: format!("view of shape {:?}", plan.shape),
                        message: format!("it reaches past the object's {} bytes", object.len()),
                    });
                }
                Ok(PayloadPart::Gather(plan.clone(), object))
            }
        }
    }

    fn len(&self) -> u64 {
        match self {
            PayloadPart::Slices(slices) => slices.iter().map(|s| s.len() as u64).sum(),
            PayloadPart::Gather(plan, _) => plan.nbytes,
        }
    }
}

/// Writes `parts` as a frame's payload: slices with vectored writes, gathered views through
/// one [`GATHER_CHUNK`] buffer (allocated only if a part needs it).
fn write_parts(stream: &mut impl Write, parts: &[PayloadPart<'_>]) -> Result<()> {
    let mut chunk: Vec<u8> = Vec::new();
    for part in parts {
        match part {
            PayloadPart::Slices(slices) => {
                let mut io: Vec<io::IoSlice<'_>> =
                    slices.iter().filter(|s| !s.is_empty()).map(|s| io::IoSlice::new(s)).collect();
                crate::frame::write_all_vectored(stream, &mut io)?;
            }
            PayloadPart::Gather(plan, object) => {
                if chunk.capacity() == 0 {
                    chunk.try_reserve_exact(GATHER_CHUNK).map_err(|_| {
                        Error::InvalidArgument("the daemon cannot allocate its view gather buffer".into())
                    })?;
                }
                for (offset, len) in plan.ranges() {
                    let range = object.get(offset as usize..(offset + len) as usize).ok_or_else(|| Error::Corrupt {
                        what: format!("view of shape {:?}", plan.shape),
                        message: format!("bytes {offset}..{} lie past the object's {}", offset + len, object.len()),
                    })?;
                    if chunk.len() + range.len() > GATHER_CHUNK {
                        crate::frame::write_all_vectored(stream, &mut [io::IoSlice::new(&chunk)])?;
                        chunk.clear();
                    }
                    chunk.extend_from_slice(range);
                }
                crate::frame::write_all_vectored(stream, &mut [io::IoSlice::new(&chunk)])?;
                chunk.clear();
            }
        }
    }
    Ok(())
}

/// One feature a get asks for: its backend object, its size by the ref's spec, and how it is
/// described on the wire.
struct Wanted<'r> {
    object: &'r str,
    /// The whole feature's bytes (what the object must hold).
    nbytes: u64,
    /// What the reply lists: the feature, or its view's shape.
    wire: WireTensor,
    /// The view asked for, planned against the ref's spec.
    plan: Option<ViewPlan>,
}

/// The features a get names (all of the ref's when `names` is absent), checked against the
/// ref's specs, with the views asked for planned (a view of a feature the get does not read,
/// or that does not fit the feature's shape, is refused before any lease is taken).
fn wanted_features<'r>(
    r: &'r SampleRef,
    names: Option<&'r [String]>,
    views: Option<&BTreeMap<String, ViewSpec>>,
) -> Result<Vec<Wanted<'r>>> {
    let names: Vec<&str> = match names {
        Some(n) => n.iter().map(String::as_str).collect(),
        None => r.feature_keys.keys().map(String::as_str).collect(),
    };
    if names.is_empty() {
        return Err(Error::InvalidArgument(format!("get of sample {} names no features", r.sample_id)));
    }
    if views.is_some()
        && let Some(twice) = names.iter().enumerate().find_map(|(i, n)| names[..i].contains(n).then_some(*n))
    {
        // One view per feature: the request maps names to views.
        return Err(Error::InvalidArgument(format!(
            "a get with views names feature {twice:?} of sample {} twice; ask for one view of it per get",
            r.sample_id
        )));
    }
    if let Some(stray) = views.into_iter().flat_map(BTreeMap::keys).find(|v| !names.contains(&v.as_str())) {
        return Err(Error::InvalidArgument(format!(
            "a view of feature {stray:?} of sample {}, which this get does not read",
            r.sample_id
        )));
    }
    names
        .into_iter()
        .map(|name| {
            let key = r
                .feature_keys
                .get(name)
                .ok_or_else(|| Error::NotFound { what: format!("feature {name:?} of sample {}", r.sample_id) })?;
            let spec: &FeatureSpec = r.feature_specs.get(name).ok_or_else(|| {
                Error::InvalidArgument(if views.is_some() {
                    format!(
                        "ref for sample {} has no spec for feature {name:?}; a view needs the feature's spec (fill \
                         a lazy file:// ref's specs with Describe first)",
                        r.sample_id
                    )
                } else {
                    format!(
                        "ref for sample {} has no spec for feature {name:?}; only file:// refs can be read without \
                         specs",
                        r.sample_id
                    )
                })
            })?;
            let nbytes = spec.nbytes()?;
            let plan =
                views.and_then(|v| v.get(name)).map(|view| view.plan_feature(r, &r.feature_specs, name)).transpose()?;
            let shape = plan.as_ref().map_or_else(|| spec.shape.clone(), |p| p.shape.clone());
            let wire = WireTensor { name: name.to_owned(), dtype: spec.dtype.clone(), shape };
            Ok(Wanted { object: raw_key(key), nbytes, wire, plan })
        })
        .collect()
}

/// An object holds exactly the bytes its spec says (the lifecycle core's rule 6).
fn check_object_len(what: impl FnOnce() -> String, held: u64, expected: u64) -> Result<()> {
    if held < expected {
        return Err(Error::ShortRead { key: what(), got: held, expected });
    }
    if held > expected {
        return Err(Error::Corrupt {
            what: what(),
            message: format!("holds {held} bytes but the ref's spec needs {expected}; the ref does not describe it"),
        });
    }
    Ok(())
}

fn unpin(arena: &ferry_shm::ArenaBackend, pin: PinId) {
    if let Err(e) = arena.unpin(pin) {
        tracing::warn!(error = %e, "unpinning an arena region");
    }
}

fn to_usize(n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| Error::InvalidArgument(format!("{n} bytes do not fit in memory")))
}

/// Views over a staged payload, one per tensor in order.
fn stage_views<'b>(tensors: &'b [WireTensor], buf: &'b [u8]) -> Result<Vec<(&'b str, TensorView<'b>)>> {
    let mut offset = 0usize;
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        let n = usize::try_from(t.nbytes()?).map_err(|_| Error::InvalidArgument("tensor too large".into()))?;
        let bytes = buf
            .get(offset..offset + n)
            .ok_or_else(|| Error::InvalidArgument(format!("tensor {:?} runs past the payload", t.name)))?;
        views.push((t.name.as_str(), TensorView::new(t.dtype()?, &t.shape, bytes)?));
        offset += n;
    }
    Ok(views)
}
