//! The part of the tuple space homed on this rank: its [`TupleStore`], the requests waiting on it (from this
//! rank's threads and from other ranks), and the leases of tuples taken by the task farm. It is a `dsm`
//! service: other ranks' requests arrive on the service-loop thread and are answered at once or, for a
//! waiting `in`/`rd`, by the `out` that satisfies them, from whichever thread makes it.
//!
//! Never blocks and never sends while holding its state lock: answers are collected under the lock and
//! sent after it.

use crate::tuple::{Template, Tuple, TupleError, MAX_TUPLE_BYTES};
use crate::tuple_store::{Delivery, Mode, TupleStore, WaiterId};
use crossbeam::channel::{Receiver, Sender};
use dsm::{Rank, Responder, Service, ServiceId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// The most tuples beyond the first that one `Complete` may lease (`TaskFarm` asks for far fewer).
const MAX_MORE: u32 = 1024;
/// The service id of the tuple space.
pub(crate) const SERVICE: ServiceId = 1;

/// A request to a home.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Ask {
    /// Add these tuples.
    Out(Vec<Tuple>),
    /// Find a tuple; with `wait`, wait for one. `lease`: the home keeps the taken tuple until `Complete`
    /// and puts it back if the taker fails. `ticket` names the request for a later `Cancel`.
    Find {
        template: Template,
        take: bool,
        wait: bool,
        lease: bool,
        ticket: u64,
    },
    /// The waiting `Find` with this ticket timed out: answer it `TimedOut` unless it was served.
    Cancel { ticket: u64 },
    /// How many tuples match.
    Count(Template),
    /// The tasks held under `leases` are done: drop the leases and add `results` (homed here), in one
    /// step; then, with `next`, lease a tuple matching the first of its templates that has one here, with
    /// up to `more` further ones matching the same template (a worker taking several small tasks per
    /// trip); when none has, wait for the first tuple to come that matches any of them.
    Complete {
        leases: Vec<u64>,
        results: Vec<Tuple>,
        next: Option<(Vec<Template>, u64)>,
        more: u32,
    },
    /// Run the registered function on `args` and `out` its result.
    Eval { function: String, args: Tuple },
    /// The tuples taken under `leases` go back into the space untouched (their holder will not use them).
    GiveBack { leases: Vec<u64> },
}

/// Why a `Complete`'s request for the next tuple would be refused (no template, or one the space cannot
/// hold), if it would: checked before the completion's leases end, so that a completion that went
/// through is never answered with an error.
fn next_refused(next: Option<&(Vec<Template>, u64)>) -> Option<String> {
    let (templates, _) = next?;
    if templates.is_empty() {
        return Some("no template to lease".into());
    }
    if let Some(why) = too_many_templates(templates.len()) {
        return Some(why);
    }
    // Looked up in every bucket of its arity, each such template would cost this home work out of
    // proportion to the request; a requester sends only templates homed here.
    if templates.iter().any(|t| t.homed_by().is_none()) {
        return Some(
            "a template whose first field is formal: a completion leases its next tuple only with templates homed where its leases are"
                .into(),
        );
    }
    templates
        .iter()
        .find_map(|t| t.check().err())
        .map(|e| e.to_string())
}

/// Why `n` templates are too many to lease the next tuple with, if they are.
pub(crate) fn too_many_templates(n: usize) -> Option<String> {
    (n > MAX_NEXT_TEMPLATES).then(|| {
        format!("{n} templates to lease the next tuple with: at most {MAX_NEXT_TEMPLATES}")
    })
}

/// A home's answer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Answer {
    /// Done.
    Done,
    /// A tuple, and its lease when one was asked for.
    Found { tuple: Tuple, lease: Option<u64> },
    /// Several tuples taken under leases (a `Complete` that asked for `more`), with their leases.
    Leased(Vec<(Tuple, u64)>),
    /// No match (non-blocking find).
    NotFound,
    /// The waiting find was cancelled before a tuple came.
    TimedOut,
    /// The number of matching tuples.
    Count(u64),
    /// The request cannot be served, and why.
    Refused(String),
}

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

/// The most templates a completion may lease its next tuple with (each is looked up, and waited on when
/// nothing matches: a peer's request must not cost the home far more than its own size). The task farm
/// asks with a few more than there are ranks.
pub(crate) const MAX_NEXT_TEMPLATES: usize = 1024;

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

#[derive(Debug)]
enum Waiter {
    Local(Sender<Found>),
    Remote {
        reply: Responder,
        ticket: u64,
    },
    /// One template of a request waiting for the first tuple that matches any of several: the group,
    /// which holds the real waiter.
    Member(u64),
}

/// A request waiting on several templates at once: one store waiter per template, all withdrawn when one is
/// served.
#[derive(Debug)]
struct Group {
    waiter: Waiter,
    holder: Rank,
    members: Vec<WaiterId>,
}

#[derive(Debug)]
struct Pending {
    waiter: Waiter,
    holder: Rank,
    lease: bool,
}

#[derive(Debug, Default)]
struct State {
    store: TupleStore,
    pending: HashMap<WaiterId, Pending>,
    /// Tuples taken under a lease: (holder, tuple), by lease id.
    leases: HashMap<u64, (Rank, Tuple)>,
    next_lease: u64,
    /// Ranks seen failing: their late requests are not served (what they would take would be lost).
    failed: HashSet<Rank>,
    /// Requests waiting on several templates, by group id.
    groups: HashMap<u64, Group>,
    next_group: u64,
    /// Other ranks' waiting requests by (sender, ticket), for their cancels to find without a scan.
    tickets: HashMap<(Rank, u64), Ticketed>,
}

/// Where a waiting request of another rank is.
#[derive(Debug, Clone, Copy)]
enum Ticketed {
    /// In `pending`, as this store waiter.
    Waiter(WaiterId),
    /// In `groups`, as this group.
    Group(u64),
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
                        home.state().leases.remove(&id);
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

impl From<Found> for Answer {
    fn from(f: Found) -> Answer {
        Answer::Found {
            tuple: f.tuple,
            lease: f.lease,
        }
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

impl State {
    fn grant(&mut self, holder: Rank, tuple: Tuple, lease: bool) -> Found {
        let lease = lease.then(|| {
            self.next_lease += 1;
            self.leases.insert(self.next_lease, (holder, tuple.clone()));
            self.next_lease
        });
        Found { tuple, lease }
    }

    fn out(&mut self, tuple: Tuple, outbox: &mut Outbox) -> Result<(), TupleError> {
        for d in self.store.out(tuple)? {
            self.deliver(d, outbox)?;
        }
        Ok(())
    }

    /// Adds several tuples in one step. A request waiting on several templates (a worker of the task
    /// farm: its own tasks first, then anyone's, then other ranks') gets the tuple it prefers among those
    /// the batch brings, not the first of the batch that it matches: a worker already waiting when the
    /// master puts every rank's tasks at once still starts with its own.
    fn out_many(&mut self, tuples: Vec<Tuple>, outbox: &mut Outbox) -> Result<(), TupleError> {
        // One tuple has nothing to be preferred to: the plain path, without the batch's bookkeeping.
        if tuples.len() < 2 {
            return tuples.into_iter().try_for_each(|t| self.out(t, outbox));
        }
        for id in self.store.put_quietly(tuples)? {
            if let Some(d) = self.store.serve(id) {
                self.deliver(d, outbox)?;
            }
        }
        Ok(())
    }

    /// Hands a tuple the store gave a waiting request to that request's waiter (a group's own waiter for
    /// a member, withdrawing the group's other members).
    fn deliver(&mut self, d: Delivery, outbox: &mut Outbox) -> Result<(), TupleError> {
        let Some(p) = self.take_pending(d.waiter) else {
            // Not reached: the store's waiters and `pending` change together. Were it reached, a tuple
            // taken for nobody goes back rather than nowhere.
            return if d.taken {
                self.out(d.tuple, outbox)
            } else {
                Ok(())
            };
        };
        let waiter = match p.waiter {
            Waiter::Member(g) => match self.dissolve(g) {
                Some(group) => group.waiter,
                // Not reached: a group's members go when the group does. Were it reached, the tuple goes
                // back rather than nowhere.
                None => return self.out(d.tuple, outbox),
            },
            w => w,
        };
        let found = self.grant(p.holder, d.tuple, p.lease);
        outbox.0.push((waiter, found, d.taken));
        Ok(())
    }

    /// Removes the record of waiting request `id` (served or withdrawn), and its ticket.
    fn take_pending(&mut self, id: WaiterId) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if let Waiter::Remote { ticket, .. } = p.waiter {
            self.tickets.remove(&(p.holder, ticket));
        }
        Some(p)
    }

    /// Withdraws every member of group `g` still waiting; returns the group.
    fn dissolve(&mut self, g: u64) -> Option<Group> {
        let group = self.groups.remove(&g)?;
        if let Waiter::Remote { ticket, .. } = group.waiter {
            self.tickets.remove(&(group.holder, ticket));
        }
        for id in &group.members {
            if self.pending.remove(id).is_some() {
                self.store.cancel(*id);
            }
        }
        Some(group)
    }

    /// Why `from`'s request waiting under `ticket` would be refused: a request of its waits under that
    /// ticket already (a peer's tickets are unique; a second would leave the first beyond its cancel).
    fn ticket_refused(&self, from: Rank, ticket: u64) -> Option<String> {
        self.tickets.contains_key(&(from, ticket)).then(|| {
            format!("{from} has a request waiting under ticket {ticket} already: a rank's tickets must be unique")
        })
    }

    /// Withdraws `from`'s request waiting under `ticket`; returns its responder, which the caller answers
    /// `TimedOut`. `None` when it waits no more (it was served, and its answer is on the way).
    fn withdraw(&mut self, from: Rank, ticket: u64) -> Option<Responder> {
        let waiter = match self.tickets.get(&(from, ticket)).copied()? {
            Ticketed::Group(g) => self.dissolve(g)?.waiter,
            Ticketed::Waiter(id) => {
                self.store.cancel(id);
                self.take_pending(id)?.waiter
            }
        };
        match waiter {
            Waiter::Remote { reply, .. } => Some(reply),
            // Not reached: only another rank's requests have tickets.
            Waiter::Local(_) | Waiter::Member(_) => None,
        }
    }

    /// Registers `waiter` for the next `out` matching any of `templates` (all taken under a lease when
    /// `lease`), after a look under the same lock found none.
    fn wait_any(
        &mut self,
        holder: Rank,
        templates: &[Template],
        lease: bool,
        waiter: Waiter,
    ) -> Result<(), TupleError> {
        if let [template] = templates {
            return self
                .wait(holder, template.clone(), Mode::Take, lease, waiter)
                .map(drop);
        }
        for t in templates {
            t.check()?;
        }
        self.next_group += 1;
        let g = self.next_group;
        let mut members = Vec::with_capacity(templates.len());
        for t in templates {
            members.push(self.wait(holder, t.clone(), Mode::Take, lease, Waiter::Member(g))?);
        }
        if let Waiter::Remote { ticket, .. } = waiter {
            self.tickets.insert((holder, ticket), Ticketed::Group(g));
        }
        self.groups.insert(
            g,
            Group {
                waiter,
                holder,
                members,
            },
        );
        Ok(())
    }

    /// Finds a tuple for `holder` now, granting the lease if one is asked for.
    fn find(
        &mut self,
        holder: Rank,
        template: &Template,
        mode: Mode,
        lease: bool,
    ) -> Result<Option<Found>, TupleError> {
        let found = self.store.find(template, mode)?;
        Ok(found.map(|t| self.grant(holder, t, lease)))
    }

    /// Registers `waiter` for the next matching `out` (after a `find` under the same lock came back empty).
    fn wait(
        &mut self,
        holder: Rank,
        template: Template,
        mode: Mode,
        lease: bool,
        waiter: Waiter,
    ) -> Result<WaiterId, TupleError> {
        let id = self.store.wait(template, mode)?;
        if let Waiter::Remote { ticket, .. } = waiter {
            self.tickets.insert((holder, ticket), Ticketed::Waiter(id));
        }
        let pending = Pending {
            waiter,
            holder,
            lease,
        };
        self.pending.insert(id, pending);
        Ok(id)
    }

    /// Serves another rank's find. Returns the answer to send now, or `None` when the request waits (its
    /// responder is kept for the `out` that will serve it).
    fn find_for(
        &mut self,
        from: Rank,
        template: Template,
        mode: Mode,
        lease: bool,
        wait: Option<u64>,
        reply: Responder,
    ) -> Option<(Responder, Answer)> {
        if lease && mode == Mode::Read {
            // A lease on a copy would put a second one into the space when given back.
            let why = "a lease is only for a tuple that is taken, not read".to_string();
            return Some((reply, Answer::Refused(why)));
        }
        match self.find(from, &template, mode, lease) {
            Ok(Some(found)) => Some((reply, found.into())),
            Ok(None) => match wait {
                None => Some((reply, Answer::NotFound)),
                Some(ticket) => match self.ticket_refused(from, ticket) {
                    Some(why) => Some((reply, Answer::Refused(why))),
                    // `find` checked the template, and checking is all `wait` can fail on.
                    None => {
                        let waiter = Waiter::Remote { reply, ticket };
                        let _ = self.wait(from, template, mode, lease, waiter);
                        None
                    }
                },
            },
            Err(e) => Some((reply, Answer::Refused(e.to_string()))),
        }
    }

    /// Ends the leases `leases` held by `holder` and adds `results`, in one step: nothing changes unless
    /// `holder` holds every one of them.
    fn complete(
        &mut self,
        holder: Rank,
        leases: &[u64],
        results: Vec<Tuple>,
        outbox: &mut Outbox,
    ) -> Result<(), String> {
        // Checked first: a result refused after the leases ended would lose its task.
        for t in &results {
            t.check().map_err(|e| e.to_string())?;
        }
        self.end_leases(holder, leases)?;
        self.out_many(results, outbox).map_err(|e| e.to_string())
    }

    /// Ends the leases `leases` held by `holder` and returns their tuples: all of them, or none (an error)
    /// unless `holder` holds every one.
    fn end_leases(&mut self, holder: Rank, leases: &[u64]) -> Result<Vec<Tuple>, String> {
        if let Some(lease) = leases
            .iter()
            .find(|l| !matches!(self.leases.get(l), Some((h, _)) if *h == holder))
        {
            return Err(format!(
                "lease {lease} is not held by {holder} (ended twice, or given back when its holder was thought failed)"
            ));
        }
        Ok(leases
            .iter()
            .filter_map(|l| self.leases.remove(l).map(|(_, t)| t))
            .collect())
    }

    /// Puts the tuples `holder` holds under `leases` back, serving waiters first. Leases it does not hold
    /// (given back already, or taken from it when it was thought failed) are named in the error, and the
    /// others go back all the same: one stale lease must not strand the tasks of the rest.
    fn give_back(
        &mut self,
        holder: Rank,
        leases: &[u64],
        outbox: &mut Outbox,
    ) -> Result<(), String> {
        let (mut stale, mut back) = (Vec::new(), Vec::new());
        for lease in leases {
            match self.leases.get(lease) {
                Some((h, _)) if *h == holder => {
                    if let Some((_, tuple)) = self.leases.remove(lease) {
                        back.push(tuple);
                    }
                }
                _ => stale.push(*lease),
            }
        }
        self.out_many(back, outbox).map_err(|e| e.to_string())?;
        if stale.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "lease(s) {stale:?} are not held by {holder} (given back twice, or when it was thought failed); the others went back"
            ))
        }
    }

    /// Up to `most` tuples here now that match the first of `templates` that has any, leased to `holder`
    /// (none when no template has a match); none after they hold [`MAX_TUPLE_BYTES`] of data, so that an
    /// answer of many large tuples stays under the size of two.
    fn lease_first(
        &mut self,
        holder: Rank,
        templates: &[Template],
        most: u32,
    ) -> Result<Vec<(Tuple, u64)>, TupleError> {
        let mut taken: Vec<(Tuple, u64)> = Vec::new();
        let mut bytes = 0;
        for template in templates {
            while taken.len() < most as usize && bytes < MAX_TUPLE_BYTES {
                match self.find(holder, template, Mode::Take, true)? {
                    Some(Found {
                        tuple,
                        lease: Some(id),
                    }) => {
                        bytes += tuple.byte_len();
                        taken.push((tuple, id));
                    }
                    _ => break,
                }
            }
            if !taken.is_empty() {
                break;
            }
        }
        Ok(taken)
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
        let mut s = self.state();
        s.pending.remove(&id);
        s.store.cancel(id)
    }

    /// The number of tuples here matching `template`.
    pub(crate) fn count(&self, template: &Template) -> usize {
        self.state().store.count(template)
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
        if s.failed.contains(&from) {
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
                Ok(()) => Some((reply, Answer::Count(s.store.count(&template) as u64))),
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
            s.failed.insert(rank);
            let gone: Vec<WaiterId> = s
                .pending
                .iter()
                .filter(|(_, p)| p.holder == rank)
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                s.pending.remove(&id);
                s.store.cancel(id);
            }
            s.groups.retain(|_, g| g.holder != rank);
            s.tickets.retain(|(holder, _), _| *holder != rank);
            let held: Vec<u64> = s
                .leases
                .iter()
                .filter(|(_, (h, _))| *h == rank)
                .map(|(id, _)| *id)
                .collect();
            let back: Vec<Tuple> = held
                .into_iter()
                .filter_map(|id| s.leases.remove(&id).map(|(_, tuple)| tuple))
                .collect();
            if let Err(e) = s.out_many(back, &mut outbox) {
                eprintln!("dsm-runtime: giving back the tuples {rank} held: {e}");
            }
        }
        outbox.send(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tuple;

    /// A home of no functions, whose eval queue no one reads.
    fn home() -> Home {
        Home::new(HashMap::new(), crossbeam::channel::bounded(1).0)
    }

    #[test]
    fn a_completion_leases_with_at_most_so_many_templates_each_with_its_first_field_given() {
        let many = |n| Some((vec![crate::template!("task", ?i64); n], 1));
        assert_eq!(next_refused(many(MAX_NEXT_TEMPLATES).as_ref()), None);
        let e = next_refused(many(MAX_NEXT_TEMPLATES + 1).as_ref()).unwrap();
        assert!(e.contains("at most 1024"), "{e}");
        assert!(next_refused(many(0).as_ref()).is_some());
        let formal = Some((
            vec![
                crate::template!("task", ?i64),
                crate::template!(?String, ?i64),
            ],
            1,
        ));
        let e = next_refused(formal.as_ref()).unwrap();
        assert!(e.contains("first field is formal"), "{e}");
    }

    #[test]
    fn evals_waiting_to_run_are_bounded_by_their_bytes_and_room_comes_back_as_they_run() {
        let (tx, rx) = crossbeam::channel::bounded(MAX_QUEUED_EVALS);
        let f: Function = Arc::new(|t: &Tuple| t.clone());
        let home = Home::new(HashMap::from([("f".to_string(), f)]), tx);
        let args = tuple!(vec![7u8; 1 << 20]);
        let accepted = (0..MAX_QUEUED_EVALS)
            .take_while(|_| home.eval("f".into(), args.clone()).is_ok())
            .count();
        assert!(
            accepted >= 32 && accepted << 20 <= MAX_QUEUED_EVAL_BYTES,
            "{accepted} evals of 1 MiB accepted"
        );
        let e = home.eval("f".into(), args.clone()).unwrap_err();
        assert!(e.contains("bytes of arguments already"), "{e}");
        // The evaluator takes (and runs, and drops) them: the room is there again.
        assert_eq!(rx.try_iter().count(), accepted);
        home.eval("f".into(), args).unwrap();
    }

    #[test]
    fn a_tuple_taken_for_a_waiter_that_is_gone_goes_back() {
        let home = home();
        let jobs = crate::template!("job", ?i64);
        let (take, taker) = crossbeam::channel::unbounded();
        let (read, reader) = crossbeam::channel::unbounded();
        home.state()
            .wait(
                Rank(0),
                jobs.clone(),
                Mode::Read,
                false,
                Waiter::Local(read),
            )
            .unwrap();
        home.state()
            .wait(
                Rank(0),
                jobs.clone(),
                Mode::Take,
                false,
                Waiter::Local(take),
            )
            .unwrap();
        // Both waiting threads are gone (a panic, say) without withdrawing their requests.
        drop((taker, reader));
        home.out(vec![tuple!("job", 7i64)]).unwrap();
        let s = home.state();
        assert_eq!(
            s.store.count(&jobs),
            1,
            "the tuple is in the space once: read in place, taken, and put back"
        );
        assert!(s.pending.is_empty(), "no request waits any more");
    }

    #[test]
    fn a_worker_waiting_when_every_ranks_tasks_come_at_once_takes_its_own() {
        let mut s = State::default();
        let mut outbox = Outbox::default();
        let (tx, rx) = crossbeam::channel::unbounded();
        let own = crate::template!("near 1", ?i64);
        let others = crate::template!("near 0", ?i64);
        s.wait_any(
            Rank(1),
            &[own.clone(), others.clone()],
            true,
            Waiter::Local(tx),
        )
        .unwrap();
        // The master's batch holds rank 0's tasks first.
        s.out_many(
            vec![
                tuple!("near 0", 1i64),
                tuple!("near 0", 2i64),
                tuple!("near 1", 3i64),
            ],
            &mut outbox,
        )
        .unwrap();
        outbox.send(&home());
        let found = rx.try_recv().expect("the waiting worker got a task");
        assert_eq!(found.tuple, tuple!("near 1", 3i64));
        assert!(found.lease.is_some(), "taken under a lease");
        assert!(rx.try_recv().is_err(), "one task for one request");
        assert_eq!(s.store.count(&others), 2, "rank 0's tasks stay for rank 0");
        assert!(
            s.groups.is_empty() && s.pending.is_empty(),
            "the request waits no more"
        );
    }

    #[test]
    fn a_lease_for_a_local_waiter_that_is_gone_ends_with_it() {
        let home = home();
        let (tx, rx) = crossbeam::channel::unbounded();
        let jobs = crate::template!("job", ?i64);
        home.state()
            .wait(Rank(0), jobs.clone(), Mode::Take, true, Waiter::Local(tx))
            .unwrap();
        drop(rx);
        home.out(vec![tuple!("job", 7i64)]).unwrap();
        let s = home.state();
        assert_eq!(s.store.count(&jobs), 1, "the tuple is back");
        assert!(s.leases.is_empty(), "and no lease holds it");
    }

    #[test]
    fn a_batch_of_leases_stops_at_the_data_one_answer_carries() {
        let mut s = State::default();
        let mut outbox = Outbox::default();
        let mb = || vec![7u8; 1 << 20];
        // Three tuples of 5 MiB each: two make more than MAX_TUPLE_BYTES (8 MiB).
        let big = || tuple!("big", mb(), mb(), mb(), mb(), mb());
        s.out_many(vec![big(), big(), big()], &mut outbox).unwrap();
        let template = crate::template!("big", ?Vec<u8>, ?Vec<u8>, ?Vec<u8>, ?Vec<u8>, ?Vec<u8>);
        let taken = s
            .lease_first(Rank(1), std::slice::from_ref(&template), 10)
            .unwrap();
        assert_eq!(taken.len(), 2);
        assert_eq!(s.store.count(&template), 1);
        // Small ones go by the count asked for.
        let small: Vec<Tuple> = (0..20i64).map(|i| tuple!("small", i)).collect();
        s.out_many(small, &mut outbox).unwrap();
        let taken = s
            .lease_first(Rank(1), &[crate::template!("small", ?i64)], 10)
            .unwrap();
        assert_eq!(taken.len(), 10);
    }

    #[test]
    fn leases_given_back_go_back_even_beside_one_not_held() {
        let mut s = State::default();
        let mut outbox = Outbox::default();
        let a = s.grant(Rank(1), tuple!("task", 1i64), true).lease.unwrap();
        let b = s.grant(Rank(1), tuple!("task", 2i64), true).lease.unwrap();
        let theirs = s.grant(Rank(2), tuple!("task", 3i64), true).lease.unwrap();
        let e = s
            .give_back(Rank(1), &[a, theirs, 99, b], &mut outbox)
            .unwrap_err();
        assert!(e.contains(&format!("[{theirs}, 99]")), "{e}");
        let template = crate::template!("task", ?i64);
        assert_eq!(
            s.store.count(&template),
            2,
            "both of rank 1's tasks are back"
        );
        assert!(s.leases.contains_key(&theirs), "rank 2 still holds its own");
        assert!(
            s.give_back(Rank(1), &[a], &mut outbox).is_err(),
            "given back twice"
        );
    }
}
