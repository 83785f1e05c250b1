//! The part of the tuple space homed on this rank: its [`TupleStore`](crate::tuple_store::TupleStore),
//! the requests waiting on it (from this rank's threads and from other ranks), and the leases of tuples
//! taken by the task farm (their state in `state`, the messages in `messages`). It is a `dsm`
//! service: other ranks' requests arrive on the service-loop thread and are answered at once or, for a
//! waiting `in`/`rd`, by the `out` that satisfies them, from whichever thread makes it.
//!
//! Never blocks and never sends while holding its state lock: answers are collected under the lock and
//! sent after it.

mod messages;
mod state;

use messages::{next_refused, MAX_MORE};
pub(crate) use messages::{too_many_templates, Answer, Ask, MAX_NEXT_TEMPLATES, SERVICE};
use state::{State, Waiter};

use crate::tuple::{Template, Tuple, TupleError};
use crate::tuple_store::{Mode, WaiterId};
use crossbeam::channel::{Receiver, Sender};
use dsm::{Rank, Responder, Service};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Tuples leased at once, with their lease ids; or the receiver of the one a later `out` will bring.
pub(crate) type LeasedOrWaiting = Result<Vec<(Tuple, u64)>, Receiver<Found>>;

/// A tuple found for a request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Found {
    pub(crate) tuple: Tuple,
    pub(crate) lease: Option<u64>,
}

/// A function `eval` can run.
pub(crate) type Function = Arc<dyn Fn(&Tuple) -> Tuple + Send + Sync>;

/// The most evals that wait for a rank's evaluator at once.
pub(crate) const MAX_QUEUED_EVALS: usize = 4096;
/// The most bytes of arguments (strings and byte strings, and [`EVAL_OVERHEAD`] for each eval) that evals
/// accepted here may hold until they have run: one eval of the largest arguments always fits.
pub(crate) const MAX_QUEUED_EVAL_BYTES: usize = 64 << 20;
/// What an eval is counted as holding beyond its arguments' strings and byte strings.
const EVAL_OVERHEAD: usize = 256;

/// An `eval` accepted here, for this rank's evaluator thread.
pub(crate) struct EvalJob {
    pub(crate) function: Function,
    pub(crate) name: String,
    pub(crate) args: Tuple,
    /// Its bytes, counted against [`MAX_QUEUED_EVAL_BYTES`] until the job is dropped (it has run).
    _held: Held,
}

/// Bytes counted in a total while held.
struct Held {
    bytes: usize,
    total: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Answers to send once the state lock is released: the waiter, what it gets, and whether the tuple
/// left the space for it (a take).
#[derive(Debug, Default)]
struct Outbox(Vec<(Waiter, Found, bool)>);

impl Outbox {
    /// Sends the answers. A tuple taken for an answer that cannot be delivered goes back into `home`
    /// (a remote holder's leased one is given back with the failed holder's leases instead; a local
    /// one's lease ends here, as this rank never fails to itself).
    fn send(self, home: &Home) {
        for (waiter, found, taken) in self.0 {
            let undelivered = match waiter {
                // A local waiter that gave up (timed out) cancels itself first, so a send that fails means
                // its thread is gone.
                Waiter::Local(tx) => tx.send(found).err().map(|e| {
                    if let Some(id) = e.0.lease {
                        home.state().end_lease(id);
                    }
                    e.0.tuple
                }),
                // A remote requester that is gone is reported by the service loop, which then gives back
                // its leases; the frame did not reach it whole.
                Waiter::Remote { reply, .. } => undelivered(reply, Answer::from(found)),
                // `State::out` puts the group's own waiter here, never a member.
                Waiter::Member(_) => None,
            };
            if taken {
                home.put_back(undelivered);
            }
        }
    }
}

/// Sends `a`; returns the tuple it carries without a lease if it could not be sent.
fn undelivered(reply: Responder, a: Answer) -> Option<Tuple> {
    match (answer(reply, &a), a) {
        (Err(_), Answer::Found { tuple, lease: None }) => Some(tuple),
        _ => None,
    }
}

fn answer(reply: Responder, a: &Answer) -> dsm::Result<()> {
    let bytes = postcard::to_allocvec(a).unwrap_or_default();
    reply.send(&[&bytes])
}

/// This rank's share of the tuple space.
pub(crate) struct Home {
    state: Mutex<State>,
    functions: HashMap<String, Function>,
    /// The evaluator's queue; `None` once this rank's tuple space has closed.
    evals: Mutex<Option<Sender<EvalJob>>>,
    /// The bytes the evals accepted here hold until they have run.
    eval_bytes: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for Home {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Home")
            .field("functions", &self.functions.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Home {
    pub(crate) fn new(functions: HashMap<String, Function>, evals: Sender<EvalJob>) -> Home {
        Home {
            state: Mutex::new(State::default()),
            functions,
            evals: Mutex::new(Some(evals)),
            eval_bytes: Arc::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops accepting `eval`s (this rank's tuple space is closing).
    pub(crate) fn close_evals(&self) {
        self.evals.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Adds tuples homed here.
    /// Puts back a tuple taken for an answer that did not reach its requester: it was never delivered.
    fn put_back(&self, tuple: Option<Tuple>) {
        if let Some(t) = tuple {
            // It was in the space before, so it fits the space's limits.
            let _ = self.out(vec![t]);
        }
    }

    pub(crate) fn out(&self, tuples: Vec<Tuple>) -> Result<(), TupleError> {
        let mut outbox = Outbox::default();
        let result = {
            let mut s = self.state();
            s.out_many(tuples, &mut outbox)
        };
        outbox.send(self);
        result
    }

    /// Finds a tuple without waiting.
    pub(crate) fn find_now(
        &self,
        holder: Rank,
        template: &Template,
        mode: Mode,
        lease: bool,
    ) -> Result<Option<Found>, TupleError> {
        self.state().find(holder, template, mode, lease)
    }

    /// Finds a tuple for a thread of this rank, or registers the thread as a waiter: then the tuple arrives
    /// on the receiver, unless `cancel_local` withdraws the waiter first.
    pub(crate) fn find_local(
        &self,
        me: Rank,
        template: &Template,
        mode: Mode,
        lease: bool,
    ) -> Result<Result<Found, (WaiterId, Receiver<Found>)>, TupleError> {
        let mut s = self.state();
        if let Some(found) = s.find(me, template, mode, lease)? {
            return Ok(Ok(found));
        }
        // Only a request that waits pays for a channel.
        let (tx, rx) = crossbeam::channel::bounded(1);
        let id = s.wait(me, template.clone(), mode, lease, Waiter::Local(tx))?;
        Ok(Err((id, rx)))
    }

    /// Withdraws a local waiter. False when it was already served: its tuple is in its receiver.
    pub(crate) fn cancel_local(&self, id: WaiterId) -> bool {
        self.state().cancel(id)
    }

    /// The number of tuples here matching `template`.
    pub(crate) fn count(&self, template: &Template) -> usize {
        self.state().count(template)
    }

    /// Ends the leases `leases` held by `holder`, adding `results` in the same step.
    pub(crate) fn complete(
        &self,
        holder: Rank,
        leases: &[u64],
        results: Vec<Tuple>,
    ) -> Result<(), String> {
        let mut outbox = Outbox::default();
        let result = self.state().complete(holder, leases, results, &mut outbox);
        outbox.send(self);
        result
    }

    /// Puts tuples this rank holds under `leases` back.
    pub(crate) fn give_back(&self, holder: Rank, leases: &[u64]) -> Result<(), String> {
        let mut outbox = Outbox::default();
        let result = self.state().give_back(holder, leases, &mut outbox);
        outbox.send(self);
        result
    }

    /// Tuples for a thread of this rank (as `lease_now` with `most`), or, when there are none, a receiver
    /// for the first tuple matching any of `templates`, leased to it.
    pub(crate) fn lease_or_wait_local(
        &self,
        me: Rank,
        templates: &[Template],
        most: u32,
    ) -> Result<LeasedOrWaiting, TupleError> {
        let mut s = self.state();
        let taken = s.lease_first(me, templates, most)?;
        if !taken.is_empty() {
            return Ok(Ok(taken));
        }
        let (tx, rx) = crossbeam::channel::bounded(1);
        s.wait_any(me, templates, true, Waiter::Local(tx))?;
        Ok(Err(rx))
    }

    /// Queues an `eval` for this rank's evaluator (at most [`MAX_QUEUED_EVALS`] wait at once, holding at
    /// most [`MAX_QUEUED_EVAL_BYTES`]: past that the eval is refused, so that a rank that sends evals faster
    /// than they run cannot fill this one's memory).
    pub(crate) fn eval(&self, function: String, args: Tuple) -> Result<(), String> {
        // The caller checks them too; a peer's are checked here as well, as every tuple is.
        args.check().map_err(|e| e.to_string())?;
        let Some(f) = self.functions.get(&function) else {
            return Err(format!(
                "no function {function:?} is registered: register it with TupleSpace::builder().function(..) on every rank"
            ));
        };
        let bytes = args.byte_len() + function.len() + EVAL_OVERHEAD;
        let before = self
            .eval_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::AcqRel);
        // Counted from here; given back when the job is dropped: refused, or run.
        let held = Held {
            bytes,
            total: self.eval_bytes.clone(),
        };
        if before > 0 && before + bytes > MAX_QUEUED_EVAL_BYTES {
            return Err(format!(
                "the evals waiting for its evaluator hold {before} bytes of arguments already (at most {MAX_QUEUED_EVAL_BYTES}): try again later, or spread the work with a task farm"
            ));
        }
        let job = EvalJob {
            function: f.clone(),
            name: function,
            args,
            _held: held,
        };
        let evals = self.evals.lock().unwrap_or_else(|p| p.into_inner());
        match evals.as_ref().map(|tx| tx.try_send(job)) {
            Some(Ok(())) => Ok(()),
            Some(Err(crossbeam::channel::TrySendError::Full(_))) => Err(format!(
                "its evaluator has {MAX_QUEUED_EVALS} evals waiting already: try again later, or spread the work with a task farm"
            )),
            _ => Err("its tuple space has closed".into()),
        }
    }

    fn serve(&self, from: Rank, ask: Ask, reply: Responder) {
        let mut outbox = Outbox::default();
        let mut s = self.state();
        if s.has_failed(from) {
            // A request that was on its way when its sender was declared failed: serving it could hand a
            // tuple to a rank that will never use it. It is refused, in case the sender lives on (a rank
            // is declared failed when one of its connections breaks): it then gets an error, not silence.
            // A cancel is never answered: the request it cancels was answered when it was served, or
            // never will be (the engine ended the sender's connections when it declared it failed), and
            // a second answer would be read as the reply to the next request on that connection.
            drop(s);
            if matches!(ask, Ask::Cancel { .. }) {
                return;
            }
            let _ = answer(
                reply,
                &Answer::Refused(format!(
                    "this home declared {from} failed and serves it no more"
                )),
            );
            return;
        }
        // A tuple an immediate answer carries left the space only for a take.
        let takes = matches!(ask, Ask::Find { take: true, .. });
        let now = match ask {
            Ask::Out(tuples) => match s.out_many(tuples, &mut outbox) {
                Ok(()) => Some((reply, Answer::Done)),
                Err(e) => Some((reply, Answer::Refused(e.to_string()))),
            },
            Ask::Find {
                template,
                take,
                wait,
                lease,
                ticket,
            } => {
                let mode = if take { Mode::Take } else { Mode::Read };
                s.find_for(from, template, mode, lease, wait.then_some(ticket), reply)
            }
            Ask::Cancel { ticket } => {
                // The cancel itself gets no answer; the waiting request gets `TimedOut`, unless it was
                // served already (its answer is on the way and the requester takes it).
                let waiting = s.withdraw(from, ticket);
                drop(s);
                if let Some(reply) = waiting {
                    let _ = answer(reply, &Answer::TimedOut);
                }
                return;
            }
            Ask::Count(template) => match template.check() {
                Err(e) => Some((reply, Answer::Refused(e.to_string()))),
                Ok(()) => Some((reply, Answer::Count(s.count(&template) as u64))),
            },
            Ask::Complete {
                leases,
                results,
                next,
                more,
            } => match next_refused(next.as_ref())
                .or_else(|| {
                    let (_, ticket) = next.as_ref()?;
                    s.ticket_refused(from, *ticket)
                })
                .map_or_else(|| s.complete(from, &leases, results, &mut outbox), Err)
            {
                Err(e) => Some((reply, Answer::Refused(e))),
                Ok(()) => match next {
                    None => Some((reply, Answer::Done)),
                    Some((templates, ticket)) => {
                        // A worker asks for a batch of a few dozen at most; the cap keeps a request
                        // from leasing more than one answer can carry.
                        let wanted = more.min(MAX_MORE) + 1;
                        match s.lease_first(from, &templates, wanted) {
                            Err(e) => Some((reply, Answer::Refused(e.to_string()))),
                            Ok(taken) if !taken.is_empty() => Some((reply, Answer::Leased(taken))),
                            // Nothing here for any of them: wait for the first tuple matching one.
                            Ok(_) => {
                                let waiter = Waiter::Remote { reply, ticket };
                                // The templates were checked (`next_refused`), and checking is all
                                // this can fail on.
                                let _ = s.wait_any(from, &templates, true, waiter);
                                None
                            }
                        }
                    }
                },
            },
            Ask::GiveBack { leases } => match s.give_back(from, &leases, &mut outbox) {
                Ok(()) => Some((reply, Answer::Done)),
                Err(e) => Some((reply, Answer::Refused(e))),
            },
            Ask::Eval { function, args } => {
                drop(s);
                outbox.send(self);
                let a = match self.eval(function, args) {
                    Ok(()) => Answer::Done,
                    Err(e) => Answer::Refused(e),
                };
                let _ = answer(reply, &a);
                return;
            }
        };
        drop(s);
        outbox.send(self);
        if let Some((reply, a)) = now {
            let back = undelivered(reply, a);
            if takes {
                self.put_back(back);
            }
        }
    }
}

impl Service for Home {
    fn request(&self, from: Rank, payload: Vec<u8>, reply: Responder) {
        match postcard::from_bytes::<Ask>(&payload) {
            // A cancellation carries a cancel and nothing else, and a cancel comes only as one: anything
            // else from a peer is its error. A request that came as a cancellation is not served (its
            // answer could not go, and a tuple it took would be lost); a cancel that came as a request is
            // refused.
            Ok(ask) if reply.cancels() != matches!(ask, Ask::Cancel { .. }) => {
                let _ = answer(
                    reply,
                    &Answer::Refused(
                        "a tuple-space cancel must come as a cancellation, and only a cancel"
                            .into(),
                    ),
                );
            }
            Ok(ask) => self.serve(from, ask, reply),
            Err(e) => {
                let _ = answer(
                    reply,
                    &Answer::Refused(format!("malformed tuple-space request: {e}")),
                );
            }
        }
    }

    fn peer_failed(&self, rank: Rank) {
        let mut outbox = Outbox::default();
        // The rank's waiting requests go unanswered: the engine has ended the rank's connections to this
        // one, so a rank that lives on (declared failed because one of its connections broke) gets an
        // error for its blocked `in`, not silence.
        {
            let mut s = self.state();
            let back = s.forget(rank);
            if let Err(e) = s.out_many(back, &mut outbox) {
                eprintln!("dsm-runtime: giving back the tuples {rank} held: {e}");
            }
        }
        outbox.send(self);
    }
}

#[cfg(test)]
mod tests;
