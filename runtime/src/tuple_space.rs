//! The job's Linda tuple space: `out`, `in`, `rd`, `inp`, `rdp`, timeouts, `count`, `eval`, and the leases
//! the task farm takes tasks under.
//!
//! Each tuple lives at a home rank chosen by hashing its first field and its arity, so the space spreads over
//! the job and a template whose first field is an actual value goes straight to the one rank that can hold
//! its matches. Operations on tuples homed on the caller's rank touch no network. A template whose first
//! field is formal could match at any rank: it takes the slower path of asking every rank in turn, and a
//! blocking one polls them (every 0.1 ms at first, backing off to every 10 ms); its waiters are not served
//! in FIFO order across ranks.
//!
//! ```no_run
//! use dsm_runtime::{template, tuple, Runtime, TupleSpace};
//! let rt = Runtime::init()?;
//! let space = TupleSpace::join(&rt)?; // collective: every rank joins
//! if rt.rank().0 == 0 {
//!     space.out(tuple!("task", 7i64))?;
//! }
//! let t = space.in_(&template!("task", ?i64))?; // one rank gets it; the others wait
//! drop(space);
//! rt.finish()?; // the job went well (a rank that ends without it leaves as a failed one)
//! # Ok::<(), dsm_runtime::RuntimeError>(())
//! ```

use crate::tuple::{Template, Tuple, Value};
use crate::tuple_home::{
    too_many_templates, Answer, Ask, EvalJob, Found, Function, Home, MAX_QUEUED_EVALS, SERVICE,
};
use crate::tuple_store::Mode;
use crate::{Runtime, RuntimeError};
use dsm::{Dsm, Rank};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The largest batch of tuples one `out_many` message carries, in encoded bytes (a bigger batch is split).
const MAX_BATCH_BYTES: usize = 4 << 20;

/// How long a worker's wait for its next task holds a wait channel before it gives the channel up and asks
/// again (see `Inner::complete`).
const COMPLETE_WAIT_SLICE: Duration = Duration::from_millis(20);

/// How long a path that asks every rank waits to see a rank fail whose answer was an error, before taking
/// the error for the answer (see `Dsm::fails_within`).
const FAILURE_NOTICED_WITHIN: Duration = Duration::from_secs(3);

/// One rank's handle on the tuple space. Cheap to clone and usable from any thread.
#[derive(Debug, Clone)]
pub struct TupleSpace {
    inner: Arc<Inner>,
    _evaluator: Arc<Evaluator>,
}

#[derive(Debug)]
struct Inner {
    /// Itself, for the leases it grants (a lease dropped unfinished gives its tuple back through it).
    this: Weak<Inner>,
    dsm: Arc<Dsm>,
    home: Arc<Home>,
    me: Rank,
    size: usize,
    tickets: AtomicU64,
    next_eval: AtomicUsize,
}

/// Runs this rank's `eval`s; stops (after the queued ones) when the last handle on the space is dropped.
#[derive(Debug)]
struct Evaluator {
    home: Arc<Home>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Evaluator {
    fn drop(&mut self) {
        self.home.close_evals();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// A tuple taken under a lease: its home keeps it until [`TupleSpace::complete`] (or
/// [`TupleSpace::give_back`]), and puts it back into the space if this rank fails first. A lease dropped
/// without either (its holder returned early, or panicked) gives the tuple back as it is dropped, so that
/// another rank can take it; that costs a round trip to the tuple's home, and a failure to reach the home
/// is printed (the home puts the tuple back when it sees this rank fail). A lease keeps this rank's part
/// of the space in use until it ends, handles on the space dropped or not: `Runtime::finish` refuses
/// while one lives, as it does while a handle does.
#[must_use = "a leased tuple is given back when the lease is dropped: complete it"]
pub struct Lease {
    /// The tuple taken.
    pub tuple: Tuple,
    home: Rank,
    id: u64,
    /// Until the lease ends, the space that granted it, to give the tuple back to if it is dropped: held,
    /// so that it can be, even once every handle on the space is gone.
    space: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("tuple", &self.tuple)
            .field("home", &self.home)
            .field("id", &self.id)
            .field("ended", &self.space.is_none())
            .finish()
    }
}

impl Lease {
    /// The lease has ended at its home (completed, or given back): dropping it does nothing more.
    fn ended(&mut self) {
        self.space = None;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(space) = self.space.take() else {
            return;
        };
        if let Err(e) = space.give_back_to(self.home, vec![self.id]) {
            eprintln!(
                "dsm-runtime: giving back a dropped lease of {:?} to {}: {e}",
                self.tuple, self.home
            );
        }
    }
}

/// Options for joining the tuple space: the functions `eval` can run.
#[derive(Default)]
pub struct SpaceBuilder {
    functions: HashMap<String, Function>,
}

impl std::fmt::Debug for SpaceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpaceBuilder")
            .field("functions", &self.functions.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SpaceBuilder {
    /// Registers `f` under `name` for [`TupleSpace::eval`]. Every rank registers the same functions.
    pub fn function(
        mut self,
        name: &str,
        f: impl Fn(&Tuple) -> Tuple + Send + Sync + 'static,
    ) -> SpaceBuilder {
        self.functions.insert(name.to_string(), Arc::new(f));
        self
    }

    /// Joins the tuple space. Collective: every rank calls it (it ends with a barrier, so that no request
    /// reaches a rank before its part of the space exists). A rank joins once.
    pub fn join(self, rt: &Runtime) -> Result<TupleSpace, RuntimeError> {
        let dsm = rt.shared_dsm();
        let (tx, rx) = crossbeam::channel::bounded::<EvalJob>(MAX_QUEUED_EVALS);
        let home = Arc::new(Home::new(self.functions, tx));
        if dsm.service_registered(SERVICE) {
            return Err(RuntimeError::Refused {
                rank: dsm.rank(),
                reason: "this rank has joined the tuple space already: join once and clone the TupleSpace handle".into(),
            });
        }
        dsm.register_service(SERVICE, home.clone())?;
        let inner = Arc::new_cyclic(|this| Inner {
            this: this.clone(),
            me: dsm.rank(),
            size: dsm.size(),
            dsm: dsm.clone(),
            home: home.clone(),
            tickets: AtomicU64::new(0),
            next_eval: AtomicUsize::new(0),
        });
        let worker = inner.clone();
        let thread = std::thread::Builder::new()
            .name("dsm-eval".into())
            .spawn(move || {
                for job in rx {
                    worker.run_eval(job);
                }
            })
            .map_err(|e| RuntimeError::Io {
                context: "starting the eval thread".into(),
                error: e,
            })?;
        // Made before the barrier, so that a barrier that fails (another rank failed) stops the eval
        // thread again: it holds this rank's `Dsm`, which would otherwise never be let go of.
        let evaluator = Arc::new(Evaluator {
            home,
            thread: Mutex::new(Some(thread)),
        });
        dsm.barrier()?;
        Ok(TupleSpace {
            inner,
            _evaluator: evaluator,
        })
    }
}

/// How long a find waits.
#[derive(Debug, Clone, Copy)]
enum Wait {
    No,
    Until(Option<Instant>),
}

impl TupleSpace {
    /// Options: functions for `eval`.
    pub fn builder() -> SpaceBuilder {
        SpaceBuilder::default()
    }

    /// Joins the tuple space without `eval` functions. Collective.
    pub fn join(rt: &Runtime) -> Result<TupleSpace, RuntimeError> {
        SpaceBuilder::default().join(rt)
    }

    /// The shared memory (and services) of the rank this handle belongs to.
    pub fn dsm(&self) -> &Dsm {
        &self.inner.dsm
    }

    /// The rank that holds tuples whose first field is `first` (none for the empty tuple) and whose arity
    /// is `arity`.
    pub fn home_of(&self, first: Option<&Value>, arity: usize) -> Rank {
        home_of(first, arity, self.inner.size)
    }

    /// Puts `tuple` into the space.
    pub fn out(&self, tuple: Tuple) -> Result<(), RuntimeError> {
        self.inner.out(tuple)
    }

    /// Puts every tuple into the space, in one message per home rank (or a few, for large batches). Not
    /// atomic across homes: a tuple that fails its checks puts none, but when a home fails (it left the
    /// job, say) the tuples of the other homes still go in, and the error names the first home that
    /// failed; its tuples may be in the space or not.
    pub fn out_many(&self, tuples: impl IntoIterator<Item = Tuple>) -> Result<(), RuntimeError> {
        let mut by_home: HashMap<Rank, Vec<Tuple>> = HashMap::new();
        for t in tuples {
            t.check()?;
            by_home
                .entry(self.home_of(t.0.first(), t.arity()))
                .or_default()
                .push(t);
        }
        let mut first_error = None;
        for (home, tuples) in by_home {
            if let Err(e) = self.out_at(home, tuples) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Puts `tuples`, all homed at `home`, in as few messages as fit.
    fn out_at(&self, home: Rank, tuples: Vec<Tuple>) -> Result<(), RuntimeError> {
        if home == self.inner.me {
            return Ok(self.inner.home.out(tuples)?);
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        for t in tuples {
            let size = t.0.iter().map(|v| 16 + v.byte_len()).sum::<usize>();
            if bytes + size > MAX_BATCH_BYTES && !batch.is_empty() {
                self.inner
                    .expect_done(home, &Ask::Out(std::mem::take(&mut batch)))?;
                bytes = 0;
            }
            bytes += size;
            batch.push(t);
        }
        if !batch.is_empty() {
            self.inner.expect_done(home, &Ask::Out(batch))?;
        }
        Ok(())
    }

    /// Takes a tuple matching `template`, waiting until there is one.
    pub fn in_(&self, template: &Template) -> Result<Tuple, RuntimeError> {
        self.inner
            .find_some(template, Mode::Take, false, None)
            .map(|(f, _)| f.tuple)
    }

    /// Reads (copies) a tuple matching `template`, waiting until there is one.
    pub fn rd(&self, template: &Template) -> Result<Tuple, RuntimeError> {
        self.inner
            .find_some(template, Mode::Read, false, None)
            .map(|(f, _)| f.tuple)
    }

    /// Takes a tuple matching `template` if there is one now.
    pub fn inp(&self, template: &Template) -> Result<Option<Tuple>, RuntimeError> {
        Ok(self
            .inner
            .find(template, Mode::Take, false, Wait::No)?
            .map(|(f, _)| f.tuple))
    }

    /// Reads a tuple matching `template` if there is one now.
    pub fn rdp(&self, template: &Template) -> Result<Option<Tuple>, RuntimeError> {
        Ok(self
            .inner
            .find(template, Mode::Read, false, Wait::No)?
            .map(|(f, _)| f.tuple))
    }

    /// Takes a tuple matching `template`, waiting at most `timeout` (`None` when none came).
    ///
    /// When the tuple's home is another rank, the timeout withdraws the request there, and the call returns
    /// with the home's answer to the withdrawal: either word that it was withdrawn, or the tuple, if the
    /// home had handed it out already. That way no tuple is taken without reaching its taker, but a home
    /// that does not answer (a stopped process, say) holds the call past `timeout`, until it answers or is
    /// taken for failed (`DSM_PEER_TIMEOUT`).
    pub fn in_timeout(
        &self,
        template: &Template,
        timeout: Duration,
    ) -> Result<Option<Tuple>, RuntimeError> {
        self.find_within(template, Mode::Take, timeout)
    }

    /// Reads a tuple matching `template`, waiting at most `timeout` (`None` when none came). Past the
    /// timeout it waits for the home's answer, as [`TupleSpace::in_timeout`] does.
    pub fn rd_timeout(
        &self,
        template: &Template,
        timeout: Duration,
    ) -> Result<Option<Tuple>, RuntimeError> {
        self.find_within(template, Mode::Read, timeout)
    }

    fn find_within(
        &self,
        template: &Template,
        mode: Mode,
        timeout: Duration,
    ) -> Result<Option<Tuple>, RuntimeError> {
        // A timeout too long to add to the clock (`Duration::MAX`, say) waits for ever.
        let deadline = Instant::now().checked_add(timeout);
        Ok(self
            .inner
            .find(template, mode, false, Wait::Until(deadline))?
            .map(|(f, _)| f.tuple))
    }

    /// The number of tuples matching `template` now.
    pub fn count(&self, template: &Template) -> Result<usize, RuntimeError> {
        template.check()?;
        match template.homed_by() {
            Some((first, arity)) => self.inner.count_at(self.home_of(first, arity), template),
            // Every rank's share, less those of failed ranks (their tuples went with them).
            None => {
                let failed = self.dsm().failed_ranks();
                (0..self.inner.size)
                    .map(|r| Rank(r as u32))
                    .filter(|r| !failed.contains(r))
                    .try_fold(0usize, |total, r| {
                        let here = match self.inner.count_at(r, template) {
                            Ok(n) => n,
                            Err(e) => self.inner.unless_failed(r, e).map(|()| 0)?,
                        };
                        Ok(total.saturating_add(here))
                    })
            }
        }
    }

    /// Runs the function registered as `function` on `args` at a rank the runtime chooses (the live ranks
    /// in turn), which `out`s its result. Returns that rank. The function's result is lost if that rank
    /// fails before putting it. A function that panics, or returns a tuple the space cannot hold (see
    /// [`Tuple::check`]), ends the rank that runs it as a failed one (status 101, as a panic of its main
    /// thread would), which ends the job: a rank waiting for the result would otherwise wait for ever.
    pub fn eval(&self, function: &str, args: Tuple) -> Result<Rank, RuntimeError> {
        args.check()?;
        let i = &self.inner;
        let first = i.me.index() + 1 + i.next_eval.fetch_add(1, Ordering::Relaxed);
        // Ranks known to have failed are passed over. One that fails while it is asked is an error, not a
        // reason to ask the next: it may have taken the function already, which would then run twice.
        let failed = self.dsm().failed_ranks();
        let at = (0..i.size)
            .map(|k| Rank(((first + k) % i.size) as u32))
            .find(|r| !failed.contains(r))
            .unwrap_or(i.me);
        if at == i.me {
            i.home
                .eval(function.to_string(), args)
                .map_err(|reason| RuntimeError::Refused { rank: at, reason })?;
        } else {
            let ask = Ask::Eval {
                function: function.to_string(),
                args,
            };
            i.expect_done(at, &ask)?;
        }
        Ok(at)
    }

    /// Takes a tuple matching `template` under a lease, waiting until there is one: if this rank fails
    /// before [`TupleSpace::complete`], the tuple goes back into the space for another rank.
    pub fn in_leased(&self, template: &Template) -> Result<Lease, RuntimeError> {
        let found = self.inner.find_some(template, Mode::Take, true, None)?;
        self.inner.lease_of(template, found)
    }

    /// Puts leased tuples back into the space untouched, for others to take: for a holder that will not do
    /// what it took (it failed, or is giving up). Leases that have ended (completed) are passed over.
    pub fn give_back(&self, leases: Vec<Lease>) -> Result<(), RuntimeError> {
        let mut by_home: std::collections::BTreeMap<Rank, Vec<u64>> = Default::default();
        for mut l in leases.into_iter().filter(|l| l.space.is_some()) {
            by_home.entry(l.home).or_default().push(l.id);
            l.ended();
        }
        // Every home is asked, whatever happens at the others; the first error is returned.
        let mut first_error = None;
        for (home, ids) in by_home {
            if let Err(e) = self.inner.give_back_to(home, ids) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Ends a lease and puts `results` in the same step at the lease's home (results homed elsewhere are
    /// put first, so a failure between the two may put them twice: give results a first field and arity
    /// that hash to the lease's home, the leased tuple's own for one, to have them put exactly once). On
    /// an error (a result over the limits, a home that cannot be reached) the lease is given back, if its
    /// home still holds it: the tuple returns to the space instead of staying held by this rank, which
    /// could no longer name it. The results homed at the
    /// lease's home go with the lease's end in one request, of at most [`dsm::MAX_SERVICE_REQUEST`]
    /// bytes: more is refused, and the same call would be refused again (put some of them first with
    /// [`TupleSpace::out`], or large data in a shared region).
    pub fn complete(&self, mut lease: Lease, results: Vec<Tuple>) -> Result<(), RuntimeError> {
        let done = self
            .inner
            .complete(std::slice::from_mut(&mut lease), results, None, 0);
        self.given_back_on_error(lease, done).map(|_| ())
    }

    /// `done`, having given `lease` back if it is an error (a home that ended the lease already refuses
    /// it, which changes nothing).
    fn given_back_on_error<T>(
        &self,
        mut lease: Lease,
        done: Result<T, RuntimeError>,
    ) -> Result<T, RuntimeError> {
        if done.is_err() {
            let _ = self.give_back(vec![lease]);
        } else {
            lease.ended();
        }
        done
    }

    /// [`TupleSpace::complete`], then [`TupleSpace::in_leased`] with `next` (homed where the lease is), in
    /// one round trip. An error in the completion gives the lease back, as `complete` does; once the
    /// completion has gone through (`next` homed elsewhere, and its home failed, say), an error leaves
    /// the results put and the lease ended. Unlike `in_leased`, a wait at another rank's home gives up
    /// its channel every 20 ms and asks again, each time at the end of the template's queue: it is not
    /// served in FIFO order with the other waiters (the task farm's workers wait this way, so that any
    /// number of them can wait on a few channels).
    pub fn complete_and_lease(
        &self,
        mut lease: Lease,
        results: Vec<Tuple>,
        next: &Template,
    ) -> Result<Lease, RuntimeError> {
        let taken = self.complete_and_lease_many(
            std::slice::from_mut(&mut lease),
            results,
            std::slice::from_ref(next),
            0,
        );
        let mut taken = self.given_back_on_error(lease, taken)?;
        taken.pop().ok_or_else(|| RuntimeError::Refused {
            rank: self.inner.me,
            reason: format!("a leased find for {next:?} came back empty"),
        })
    }

    /// [`TupleSpace::complete`] for several leases and their results at once. Each lease is marked
    /// ended as it ends; on an error, those not ended are the caller's still, to give back (some may have
    /// ended when they are of several homes: [`TupleSpace::give_back`] skips them).
    pub(crate) fn complete_many(
        &self,
        leases: &mut [Lease],
        results: Vec<Tuple>,
    ) -> Result<(), RuntimeError> {
        self.inner.complete(leases, results, None, 0).map(drop)
    }

    /// Ends every lease in `leases` and puts `results` (as [`TupleSpace::complete`]), then takes under
    /// leases tuples matching the first template in `next` that has any (with the first, up to `more`
    /// further ones its home holds at that moment), or, when none has, waits for the first tuple to come
    /// that matches any of them. One round trip when every template is homed where the leases are (else
    /// the templates are looked at one by one, and the wait is for one matching the last). Returns at
    /// least one lease. This is how a worker takes several small tasks per trip, its own first. On an
    /// error, `leases` are still held if the completion failed (some of several homes may have ended
    /// first), and ended (the results put) if it went through and taking the next tuple failed, each
    /// marked so: [`TupleSpace::give_back`] gives back only those still held.
    pub(crate) fn complete_and_lease_many(
        &self,
        leases: &mut [Lease],
        results: Vec<Tuple>,
        next: &[Template],
        more: u32,
    ) -> Result<Vec<Lease>, RuntimeError> {
        let Some((last, first)) = next.split_last() else {
            return Err(RuntimeError::Refused {
                rank: self.inner.me,
                reason: "no template to lease the next tuple with".into(),
            });
        };
        if let Some(reason) = too_many_templates(next.len()) {
            return Err(RuntimeError::Refused {
                rank: self.inner.me,
                reason,
            });
        }
        for t in next {
            t.check()?;
        }
        let taken = self.inner.complete(leases, results, Some(next), more)?;
        if !taken.is_empty() {
            return Ok(taken);
        }
        // The templates are not all homed where the leases were: one by one, the last one waiting.
        for t in first {
            if let Some(found) = self.inner.find(t, Mode::Take, true, Wait::No)? {
                return Ok(vec![self.inner.lease_of(t, found)?]);
            }
        }
        Ok(vec![self.in_leased(last)?])
    }
}

/// The home of a tuple with this first field and arity, in a job of `size` ranks. Deterministic across the
/// job's processes (they run one program).
fn home_of(first: Option<&Value>, arity: usize, size: usize) -> Rank {
    let mut h = std::hash::DefaultHasher::new();
    first.hash(&mut h);
    arity.hash(&mut h);
    Rank((h.finish() % size as u64) as u32)
}

impl Inner {
    fn out(&self, tuple: Tuple) -> Result<(), RuntimeError> {
        tuple.check()?;
        let home = home_of(tuple.0.first(), tuple.arity(), self.size);
        if home == self.me {
            return Ok(self.home.out(vec![tuple])?);
        }
        self.expect_done(home, &Ask::Out(vec![tuple]))
    }

    /// Runs one eval and puts its result. An eval whose function panics, or whose result cannot be a
    /// tuple of the space, ends this rank as a failed one (status 101, as a panic of its main thread
    /// would): its result will never come, and a rank waiting for it would otherwise wait for ever.
    fn run_eval(&self, job: EvalJob) {
        let f = job.function;
        let failure = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&job.args)))
        {
            Ok(result) => match result.check() {
                Ok(()) => {
                    // A valid result that cannot be put: its home failed (the job sees that failure).
                    if let Err(e) = self.out(result) {
                        eprintln!(
                            "dsm-runtime: {}: putting the result of eval {:?}: {e}",
                            self.me, job.name
                        );
                    }
                    return;
                }
                Err(e) => format!("its result is not a tuple the space can hold: {e}"),
            },
            Err(panic) => format!("it panicked: {}", dsm::panic_message(&*panic)),
        };
        eprintln!(
            "dsm-runtime: {}: eval {:?} on {:?} failed: {failure}. This rank ends as a failed one (status 101), so that no rank waits for ever for the result",
            self.me, job.name, job.args
        );
        std::process::exit(101);
    }

    fn template_home(&self, template: &Template) -> Option<Rank> {
        template
            .homed_by()
            .map(|(first, arity)| home_of(first, arity, self.size))
    }

    /// A find that waits (until `deadline`, or for ever): it returns a tuple or an error.
    fn find_some(
        &self,
        template: &Template,
        mode: Mode,
        lease: bool,
        deadline: Option<Instant>,
    ) -> Result<(Found, Rank), RuntimeError> {
        self.find(template, mode, lease, Wait::Until(deadline))?
            .ok_or_else(|| RuntimeError::Refused {
                rank: self.me,
                reason: "a find without a deadline came back empty".into(),
            })
    }

    fn find(
        &self,
        template: &Template,
        mode: Mode,
        lease: bool,
        wait: Wait,
    ) -> Result<Option<(Found, Rank)>, RuntimeError> {
        template.check()?;
        if let Some(home) = self.template_home(template) {
            return Ok(self
                .find_at(home, template, mode, lease, wait)?
                .map(|f| (f, home)));
        }
        // The first field is formal: ask every rank, this one first, and poll while waiting.
        let deadline = match wait {
            Wait::No => Some(Instant::now()),
            Wait::Until(d) => d,
        };
        let mut pause = Duration::from_micros(100);
        loop {
            // Failed ranks are passed over: their tuples went with them.
            let failed = self.dsm.failed_ranks();
            for i in 0..self.size {
                let r = Rank(((self.me.index() + i) % self.size) as u32);
                if failed.contains(&r) {
                    continue;
                }
                match self.find_at(r, template, mode, lease, Wait::No) {
                    Ok(Some(f)) => return Ok(Some((f, r))),
                    Ok(None) => {}
                    Err(e) => self.unless_failed(r, e)?,
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            let nap = deadline.map_or(pause, |d| {
                pause.min(d.saturating_duration_since(Instant::now()))
            });
            std::thread::sleep(nap);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    /// `Err(e)` for an error `e` from asking `rank`, unless `rank` has failed (seen within a few seconds):
    /// the paths that ask every rank pass over failed ranks, whose tuples went with them.
    fn unless_failed(&self, rank: Rank, e: RuntimeError) -> Result<(), RuntimeError> {
        // Only a broken connection may mean a failed rank (an answer refused came from a live one).
        let broken = matches!(e, RuntimeError::Dsm(dsm::DsmError::PeerFailed { .. }));
        if broken && self.dsm.fails_within(rank, FAILURE_NOTICED_WITHIN) {
            Ok(())
        } else {
            Err(e)
        }
    }

    fn find_at(
        &self,
        home: Rank,
        template: &Template,
        mode: Mode,
        lease: bool,
        wait: Wait,
    ) -> Result<Option<Found>, RuntimeError> {
        if home == self.me {
            return self.find_here(template, mode, lease, wait);
        }
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let ask = Ask::Find {
            template: template.clone(),
            take: mode == Mode::Take,
            wait: matches!(wait, Wait::Until(_)),
            lease,
            ticket,
        };
        let answer = match wait {
            Wait::No => self.ask(home, &ask)?,
            Wait::Until(deadline) => self
                .ask_waiting(home, &ask, deadline, ticket)?
                .unwrap_or(Answer::TimedOut),
        };
        match answer {
            Answer::Found { tuple, lease } if template.matches(&tuple) => {
                Ok(Some(Found { tuple, lease }))
            }
            // A wait without a deadline ends with a tuple: an empty answer to it is the home's error.
            Answer::NotFound | Answer::TimedOut if !matches!(wait, Wait::Until(None)) => Ok(None),
            other => Err(self.refuse(home, other)),
        }
    }

    fn find_here(
        &self,
        template: &Template,
        mode: Mode,
        lease: bool,
        wait: Wait,
    ) -> Result<Option<Found>, RuntimeError> {
        let Wait::Until(deadline) = wait else {
            return Ok(self.home.find_now(self.me, template, mode, lease)?);
        };
        let (id, rx) = match self.home.find_local(self.me, template, mode, lease)? {
            Ok(found) => return Ok(Some(found)),
            Err(waiting) => waiting,
        };
        let got = match deadline {
            None => rx.recv().ok(),
            Some(d) => match rx.recv_deadline(d) {
                Ok(f) => Some(f),
                // Withdrawn in time: nothing was taken. Otherwise an `out` served it meanwhile, and its
                // tuple is in the channel.
                Err(_) if self.home.cancel_local(id) => return Ok(None),
                Err(_) => rx.recv().ok(),
            },
        };
        got.map(Some).ok_or_else(|| RuntimeError::Refused {
            rank: self.me,
            reason: "this rank's tuple space dropped a waiting request".into(),
        })
    }

    fn lease_of(&self, template: &Template, found: (Found, Rank)) -> Result<Lease, RuntimeError> {
        let (found, home) = found;
        match found.lease {
            Some(id) => Ok(Lease {
                tuple: found.tuple,
                home,
                id,
                space: self.this.upgrade(),
            }),
            None => Err(RuntimeError::Refused {
                rank: home,
                reason: format!("a leased find for {template:?} came back without a lease"),
            }),
        }
    }

    /// Ends `leases` and puts `results`; then, with `next` homed where the leases are, leases tuples
    /// matching the first of its templates that has any there (up to `more` + 1), or waits for the first
    /// to come that matches any of them. Returns what it leased: nothing when `next` is `None` or not all
    /// homed there (the caller asks for it itself).
    /// The leases are borrowed: a caller keeps them (to give them back) until this has succeeded; nothing
    /// is sent when a result is refused.
    ///
    /// Leases of several homes (a caller mixing tuples of several homes) end at the first one's home with
    /// the results, and then, without results, at the others' homes, one by one; `next` is then left to
    /// the caller. Ended before the results were in, a failure of that first step would leave their
    /// tuples taken for good with no result put (a task farm's tasks lost); ended after, a failure leaves
    /// them held, to be given back and done again (their results, put already, then put twice, as for a
    /// failure between results homed elsewhere and the lease's end). Those that end are marked ended as
    /// they do, so that a caller gives back only the others. Leases of one home that ended before taking
    /// `next` failed (the wait for it broke off) are marked ended too: they are no longer the caller's
    /// to give back.
    fn complete(
        &self,
        leases: &mut [Lease],
        results: Vec<Tuple>,
        next: Option<&[Template]>,
        more: u32,
    ) -> Result<Vec<Lease>, RuntimeError> {
        let Some(home) = leases.first().map(|l| l.home) else {
            return self.complete_at(None, Vec::new(), results, next, more, &mut false);
        };
        let ids = leases
            .iter()
            .filter(|l| l.home == home)
            .map(|l| l.id)
            .collect();
        if leases.iter().all(|l| l.home == home) {
            let mut ended = false;
            let taken = self.complete_at(Some(home), ids, results, next, more, &mut ended);
            if ended {
                leases.iter_mut().for_each(Lease::ended);
            }
            return taken;
        }
        self.complete_at(Some(home), ids, results, None, 0, &mut false)?;
        let (ours, others): (Vec<&mut Lease>, Vec<&mut Lease>) =
            leases.iter_mut().partition(|l| l.home == home);
        ours.into_iter().for_each(Lease::ended);
        for other in others {
            self.complete_at(
                Some(other.home),
                vec![other.id],
                Vec::new(),
                None,
                0,
                &mut false,
            )?;
            other.ended();
        }
        Ok(Vec::new())
    }

    /// [`Inner::complete`] for the leases `ids`, all of them homed at `leases_home` (`None` for none).
    /// Sets `ended` once their home has ended them and put the results, which an error after that (in
    /// taking `next`) does not undo.
    fn complete_at(
        &self,
        leases_home: Option<Rank>,
        ids: Vec<u64>,
        results: Vec<Tuple>,
        next: Option<&[Template]>,
        more: u32,
        ended: &mut bool,
    ) -> Result<Vec<Lease>, RuntimeError> {
        for t in &results {
            t.check()?;
        }
        // Where the request goes: the leases' home or, with none, the home of every template in `next`.
        let templates_home = next.and_then(|n| {
            let home = self.template_home(n.first()?)?;
            n.iter()
                .all(|t| self.template_home(t) == Some(home))
                .then_some(home)
        });
        let Some(home) = leases_home.or(templates_home) else {
            for t in results {
                self.out(t)?;
            }
            return Ok(Vec::new());
        };
        let (here, elsewhere): (Vec<Tuple>, Vec<Tuple>) = results
            .into_iter()
            .partition(|t| home_of(t.0.first(), t.arity(), self.size) == home);
        for t in elsewhere {
            self.out(t)?;
        }
        // `next` rides along only when its tuples are homed where the leases are.
        let next =
            next.filter(|n| !n.is_empty() && n.iter().all(|t| self.template_home(t) == Some(home)));
        let leased = |(tuple, id): (Tuple, u64)| Lease {
            tuple,
            home,
            id,
            space: self.this.upgrade(),
        };
        if home == self.me {
            self.home
                .complete(self.me, &ids, here)
                .map_err(|reason| RuntimeError::Refused {
                    rank: self.me,
                    reason,
                })?;
            *ended = true;
            let Some(n) = next else {
                return Ok(Vec::new());
            };
            return match self
                .home
                .lease_or_wait_local(self.me, n, more.saturating_add(1))?
            {
                Ok(taken) => Ok(taken.into_iter().map(leased).collect()),
                Err(rx) => {
                    let found = rx.recv().map_err(|_| RuntimeError::Refused {
                        rank: self.me,
                        reason: "this rank's tuple space dropped a waiting request".into(),
                    })?;
                    Ok(vec![self.lease_of(&n[0], (found, home))?])
                }
            };
        }
        let mut ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let mut ask = Ask::Complete {
            leases: ids,
            results: here,
            next: next.map(|n| (n.to_vec(), ticket)),
            more,
        };
        let answer = match next {
            None => self.ask(home, &ask)?,
            // A wait for the next tuple holds one of this rank's wait channels, and a rank has few: with
            // more threads waiting than channels, a thread holding the result that the others' next tasks
            // depend on could never send it (the master puts the reduces only once every map is in). So
            // the wait gives its channel up every `COMPLETE_WAIT_SLICE` and asks again; the leases ended and
            // the results went in with the first ask.
            Some(n) => loop {
                let deadline = Instant::now() + COMPLETE_WAIT_SLICE;
                match self.ask_waiting(home, &ask, Some(deadline), ticket)? {
                    // Not sent: the leases and results are still to go, in the same ask.
                    None => std::thread::yield_now(),
                    Some(Answer::TimedOut) => {
                        // The home ended the leases and put the results before it waited.
                        *ended = true;
                        std::thread::yield_now();
                        ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
                        ask = Ask::Complete {
                            leases: Vec::new(),
                            results: Vec::new(),
                            next: Some((n.to_vec(), ticket)),
                            more,
                        };
                    }
                    Some(answer) => break answer,
                }
            },
        };
        // Any answer but a refusal comes after the home ended the leases. (A refusal of a `next` it could
        // not lease comes after it too, but the home checks the templates first, and that is all leasing
        // fails on: a refusal means the leases are still held.)
        if !matches!(answer, Answer::Refused(_)) {
            *ended = true;
        }
        match (answer, next) {
            (Answer::Done, None) => Ok(Vec::new()),
            (Answer::Found { tuple, lease }, Some(n)) if n.iter().any(|m| m.matches(&tuple)) => Ok(
                vec![self.lease_of(&n[n.len() - 1], (Found { tuple, lease }, home))?],
            ),
            (Answer::Leased(taken), Some(n)) => {
                let fits = !taken.is_empty()
                    && taken.len() <= more as usize + 1
                    && taken.iter().all(|(t, _)| n.iter().any(|m| m.matches(t)));
                if fits {
                    return Ok(taken.into_iter().map(leased).collect());
                }
                Err(self.refuse(home, Answer::Leased(taken)))
            }
            (other, _) => Err(self.refuse(home, other)),
        }
    }

    /// The error for `answer`, which `home` should not have given (not what was asked for, or a tuple that
    /// does not match the template): whatever the home leased to this rank in it goes back first. (A tuple
    /// it took for good is named in the error.)
    fn refuse(&self, home: Rank, answer: Answer) -> RuntimeError {
        let ids: Vec<u64> = match &answer {
            Answer::Found {
                lease: Some(id), ..
            } => vec![*id],
            Answer::Leased(taken) => taken.iter().map(|(_, id)| *id).collect(),
            _ => Vec::new(),
        };
        if !ids.is_empty() {
            let _ = self.give_back_at(home, ids);
        }
        unexpected(home, answer)
    }

    /// Asks `home` (another rank) to put back the tuples this rank holds there under `leases`.
    fn give_back_at(&self, home: Rank, leases: Vec<u64>) -> Result<(), RuntimeError> {
        self.expect_done(home, &Ask::GiveBack { leases })
    }

    /// Gives back the tuples held under `leases` at `home`, this rank's own or another's.
    fn give_back_to(&self, home: Rank, leases: Vec<u64>) -> Result<(), RuntimeError> {
        if home == self.me {
            self.home
                .give_back(home, &leases)
                .map_err(|reason| RuntimeError::Refused { rank: home, reason })
        } else {
            self.give_back_at(home, leases)
        }
    }

    fn count_at(&self, home: Rank, template: &Template) -> Result<usize, RuntimeError> {
        if home == self.me {
            return Ok(self.home.count(template));
        }
        match self.ask(home, &Ask::Count(template.clone()))? {
            Answer::Count(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            other => Err(unexpected(home, other)),
        }
    }

    fn expect_done(&self, home: Rank, ask: &Ask) -> Result<(), RuntimeError> {
        match self.ask(home, ask)? {
            Answer::Done => Ok(()),
            other => Err(unexpected(home, other)),
        }
    }

    fn ask(&self, home: Rank, ask: &Ask) -> Result<Answer, RuntimeError> {
        let bytes = encode(ask);
        decode(home, &self.dsm.call(home, SERVICE, &[&bytes])?)
    }

    /// A request the home may hold; past `deadline` it is cancelled (by `ticket`). `None`: the deadline
    /// passed before the request could be sent (other threads' waits held every channel), so the home
    /// never saw it.
    fn ask_waiting(
        &self,
        home: Rank,
        ask: &Ask,
        deadline: Option<Instant>,
        ticket: u64,
    ) -> Result<Option<Answer>, RuntimeError> {
        let bytes = encode(ask);
        let cancel = encode(&Ask::Cancel { ticket });
        let deadline = deadline.map(|d| (d, &cancel[..]));
        match self.dsm.call_waiting(home, SERVICE, &[&bytes], deadline) {
            Ok(answer) => decode(home, &answer).map(Some),
            // Never sent: the deadline passed while other threads' waits held every channel.
            Err(dsm::DsmError::TimedOut { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

fn encode(ask: &Ask) -> Vec<u8> {
    // Tuples and templates are plain data: encoding into a vector cannot fail.
    postcard::to_allocvec(ask).unwrap_or_default()
}

fn decode(home: Rank, bytes: &[u8]) -> Result<Answer, RuntimeError> {
    postcard::from_bytes(bytes).map_err(|e| {
        RuntimeError::Dsm(dsm::DsmError::Protocol {
            rank: home,
            what: format!("a tuple-space answer does not decode: {e}"),
        })
    })
}

fn unexpected(home: Rank, answer: Answer) -> RuntimeError {
    match answer {
        Answer::Refused(reason) => RuntimeError::Refused { rank: home, reason },
        other => RuntimeError::Dsm(dsm::DsmError::Protocol {
            rank: home,
            what: format!("unexpected tuple-space answer {other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tuple;

    #[test]
    fn homes_spread_over_ranks_and_depend_on_first_field_and_arity() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..64i64 {
            let t = tuple!(i, "x");
            seen.insert(home_of(t.0.first(), t.arity(), 4));
        }
        assert_eq!(seen.len(), 4, "64 first fields reach every one of 4 ranks");
        let differ = (0..64i64)
            .any(|i| home_of(Some(&Value::I64(i)), 2, 4) != home_of(Some(&Value::I64(i)), 3, 4));
        assert!(differ, "arity takes part in the home");
        assert_eq!(home_of(None, 0, 1), Rank(0));
    }

    /// A home that answers every find with a tuple matching nothing asked for (leased when a lease was asked
    /// for), and records the leases given back to it.
    #[derive(Debug, Default)]
    struct Liar {
        given_back: Mutex<Vec<u64>>,
    }

    impl dsm::Service for Liar {
        fn request(&self, _from: Rank, payload: Vec<u8>, reply: dsm::Responder) {
            let answer = match postcard::from_bytes::<Ask>(&payload) {
                Ok(Ask::Find { lease, .. }) => Answer::Found {
                    tuple: tuple!("not", "asked", "for"),
                    lease: lease.then_some(7),
                },
                Ok(Ask::GiveBack { leases }) => {
                    self.given_back.lock().unwrap().extend(leases);
                    Answer::Done
                }
                _ => Answer::Refused("not served by this test's home".into()),
            };
            let _ = reply.send(&[&postcard::to_allocvec(&answer).unwrap()]);
        }
    }

    /// `lease` and a lease of a tuple `(name, 1)` homed at rank 0, which this puts first; with the name
    /// and the template `(name, ?i64)`.
    fn and_one_homed_at_rank_0(space: &TupleSpace, lease: Lease) -> (String, Template, Vec<Lease>) {
        let name = (0..)
            .map(|i| format!("zero{i}"))
            .find(|n| space.home_of(Some(&Value::Str(n.clone())), 2) == Rank(0))
            .unwrap();
        let t = crate::template!(name.clone(), ?i64);
        space.out(crate::tuple!(name.clone(), 1i64)).unwrap();
        let leases = vec![lease, space.in_leased(&t).unwrap()];
        (name, t, leases)
    }

    /// A first field beginning with `prefix` whose tuples of two fields are homed at rank 1.
    fn homed_at_rank_1(space: &TupleSpace, prefix: &str) -> String {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|n| space.home_of(Some(&Value::Str(n.clone())), 2) == Rank(1))
            .unwrap()
    }

    /// A 2-rank job in which rank 0 leases a tuple `(name, 1)` homed at rank 1 and runs `body` with the
    /// runtime, the space, the name, the template `(name, ?i64)` and the lease; then both ranks meet.
    fn with_a_lease_homed_at_rank_1(
        prefix: &'static str,
        body: impl Fn(&Runtime, &TupleSpace, &str, &Template, Lease) + Send + Sync + 'static,
    ) {
        crate::local::run_local_job(2, 3, move |rt| {
            let space = TupleSpace::join(rt).unwrap();
            let name = homed_at_rank_1(&space, prefix);
            let t = crate::template!(name.clone(), ?i64);
            if rt.rank() == Rank(0) {
                space.out(crate::tuple!(name.clone(), 1i64)).unwrap();
                let lease = space.in_leased(&t).unwrap();
                body(rt, &space, &name, &t, lease);
            }
            rt.dsm().barrier().unwrap();
        });
    }

    #[test]
    fn a_completion_whose_next_request_is_refused_leaves_its_leases_held() {
        with_a_lease_homed_at_rank_1("c", |rt, space, _, t, lease| {
            // A completion asking for the next tuple with no template (the client refuses to send
            // one; a peer of another mind might).
            let ask = encode(&Ask::Complete {
                leases: vec![lease.id],
                results: Vec::new(),
                next: Some((Vec::new(), 1)),
                more: 0,
            });
            let answer = rt.dsm().call(Rank(1), SERVICE, &[&ask]).unwrap();
            let answer = decode(Rank(1), &answer).unwrap();
            assert!(matches!(answer, Answer::Refused(_)), "{answer:?}");
            // The lease was not ended: completing it now goes through.
            space.complete(lease, Vec::new()).unwrap();
            assert_eq!(space.count(t).unwrap(), 0);
        });
    }

    #[test]
    fn leases_that_ended_before_the_wait_for_the_next_tuple_broke_off_are_marked_ended() {
        dsm::transport::local::run_local_job(2, 3, |dsm| {
            let rt = Runtime::from_dsm(dsm);
            let space = TupleSpace::join(&rt).unwrap();
            let name = homed_at_rank_1(&space, "broke");
            let t = crate::template!(name.clone(), ?i64);
            if rt.rank() == Rank(0) {
                space.out(crate::tuple!(name.clone(), 1i64)).unwrap();
                let mut leases = vec![space.in_leased(&t).unwrap()];
                // Homed at rank 1 too (the same first field and arity), and nothing will match it: the
                // completion goes in, then its wait for the next tuple breaks off as rank 1 leaves.
                let next = crate::template!(name.clone(), ?String);
                let result = crate::tuple!(name.clone(), 2i64);
                let e = space
                    .complete_and_lease_many(&mut leases, vec![result], &[next], 0)
                    .unwrap_err();
                assert!(e.to_string().contains("rank 1"), "{e}");
                // Rank 1 ended the lease: it is not this rank's to give back (a worker giving it back
                // was told the home refused it, as if its task were not done).
                assert!(
                    leases[0].space.is_none(),
                    "the lease is still taken as held"
                );
            } else {
                // The result is in (the lease ended with it); a waiting ask gives its channel up every
                // 20 ms and is told so, by which its sender learns that the completion went through.
                while space.count(&t).unwrap() == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            // Both leave without the final barrier: rank 1 as a failed rank, rank 0 once it saw that.
            drop(space);
            drop(rt);
        });
    }

    #[test]
    fn leases_that_ended_are_not_given_back() {
        with_a_lease_homed_at_rank_1("g", |_, space, name, t, lease| {
            // Completed in place (as a worker's held leases are): giving them back afterwards (a worker
            // whose next find failed, dropping what it holds) asks nothing of their home, which would
            // refuse leases it no longer holds.
            let mut leases = vec![lease];
            space
                .complete_many(&mut leases, vec![crate::tuple!(name, 2i64)])
                .unwrap();
            space.give_back(leases).unwrap();
            assert_eq!(
                space.count(t).unwrap(),
                1,
                "the result, not the leased tuple"
            );
            assert_eq!(space.in_(t).unwrap(), crate::tuple!(name, 2i64));
        });
    }

    #[test]
    fn leases_of_another_home_stay_held_when_the_completion_with_the_results_fails() {
        with_a_lease_homed_at_rank_1("mixed", |_, space, name, t, lease| {
            // A second lease, homed at rank 0, after the first: its end comes with no result.
            let (_, mine_t, mut leases) = and_one_homed_at_rank_0(space, lease);
            // The results (homed at rank 1, where the first lease is) are more than a request carries:
            // the completion is refused.
            let results = (0..=dsm::MAX_SERVICE_REQUEST >> 20)
                .map(|_| crate::tuple!(name, vec![0u8; 1 << 20]))
                .collect();
            let e = space.complete_many(&mut leases, results).unwrap_err();
            assert!(e.to_string().contains("a request carries at most"), "{e}");
            // Both are still held (the one at rank 0 used to be ended first, its tuple taken for good
            // with no result put): given back, both tuples are in the space again.
            space.give_back(leases).unwrap();
            assert_eq!(space.count(t).unwrap(), 1);
            assert_eq!(space.count(&mine_t).unwrap(), 1, "a lease's tuple was lost");
        });
    }

    #[test]
    fn leases_of_two_homes_that_end_are_marked_so_when_a_later_one_fails() {
        with_a_lease_homed_at_rank_1("marked", |rt, space, name, t, lease| {
            let (_, mine_t, mut leases) = and_one_homed_at_rank_0(space, lease);
            // The lease at rank 0 is given back behind its holder's back: ending it will be refused.
            let ask = encode(&Ask::GiveBack {
                leases: vec![leases[1].id],
            });
            let answer = rt.dsm().call(Rank(0), SERVICE, &[&ask]).unwrap();
            assert!(matches!(decode(Rank(0), &answer), Ok(Answer::Done)));
            let result = crate::tuple!(name, 5i64);
            assert!(space.complete_many(&mut leases, vec![result]).is_err());
            // The first ended, with its result put; the second did not end (its home refused it).
            let ended: Vec<bool> = leases.iter().map(|l| l.space.is_none()).collect();
            assert_eq!(ended, vec![true, false]);
            assert_eq!(space.in_(t).unwrap(), crate::tuple!(name, 5i64));
            assert_eq!(space.count(&mine_t).unwrap(), 1);
            // (Its home, which has it back already, refuses to take it back again.)
            let _ = space.give_back(leases);
        });
    }

    #[test]
    fn leases_of_two_homes_complete_with_their_results() {
        with_a_lease_homed_at_rank_1("both", |_, space, name, t, lease| {
            let (mine, mine_t, mut leases) = and_one_homed_at_rank_0(space, lease);
            let results = vec![crate::tuple!(name, 5i64), crate::tuple!(mine.clone(), 6i64)];
            space.complete_many(&mut leases, results).unwrap();
            space.give_back(leases).unwrap();
            assert_eq!(space.in_(t).unwrap(), crate::tuple!(name, 5i64));
            assert_eq!(space.in_(&mine_t).unwrap(), crate::tuple!(mine, 6i64));
            assert_eq!(space.count(t).unwrap() + space.count(&mine_t).unwrap(), 0);
        });
    }

    #[test]
    fn results_more_than_a_request_carries_are_refused_with_nothing_put_and_the_tuple_back() {
        with_a_lease_homed_at_rank_1("big", |_, space, name, t, lease| {
            // Each result is within the limits; all together, homed where the lease is, are more than
            // one request carries.
            let results = (0..=dsm::MAX_SERVICE_REQUEST >> 20)
                .map(|_| crate::tuple!(name, vec![0u8; 1 << 20]))
                .collect();
            let e = space.complete(lease, results).unwrap_err();
            assert!(e.to_string().contains("a request carries at most"), "{e}");
            // Nothing was put, and the leased tuple is back.
            assert_eq!(space.count(t).unwrap(), 1);
            assert_eq!(space.count(&crate::template!(name, ?Vec<u8>)).unwrap(), 0);
        });
    }

    #[test]
    fn a_second_waiting_request_under_one_ticket_is_refused() {
        crate::local::run_local_job(2, 3, |rt| {
            let space = TupleSpace::join(rt).unwrap();
            let name = homed_at_rank_1(&space, "w");
            let t = crate::template!(name.clone(), ?i64);
            if rt.rank() == Rank(0) {
                // Two waiting finds under one ticket (the client never reuses one; a peer of another mind
                // might): whichever comes second is refused, so a cancel always finds the one it names.
                let find = encode(&Ask::Find {
                    template: t.clone(),
                    take: true,
                    wait: true,
                    lease: false,
                    ticket: 7,
                });
                let dsm = rt.shared_dsm();
                let answers: Vec<Answer> = std::thread::scope(|s| {
                    let asks: Vec<_> = (0..2)
                        .map(|_| {
                            s.spawn(|| {
                                decode(Rank(1), &dsm.call(Rank(1), SERVICE, &[&find]).unwrap())
                            })
                        })
                        .collect();
                    // Two tuples, so that without the refusal both finds are served and the test ends.
                    let served = |a: &Answer| matches!(a, Answer::Found { .. });
                    // The refusal comes back at once; without it, both wait until the tuples come.
                    let give_up = Instant::now() + Duration::from_secs(2);
                    while !asks.iter().any(|a| a.is_finished()) && Instant::now() < give_up {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    space.out(crate::tuple!(name.clone(), 1i64)).unwrap();
                    space.out(crate::tuple!(name.clone(), 2i64)).unwrap();
                    let answers: Vec<Answer> = asks
                        .into_iter()
                        .map(|a| a.join().unwrap().unwrap())
                        .collect();
                    assert_eq!(
                        answers.iter().filter(|a| served(a)).count(),
                        1,
                        "{answers:?}"
                    );
                    answers
                });
                let refused = answers.iter().find_map(|a| match a {
                    Answer::Refused(why) => Some(why.clone()),
                    _ => None,
                });
                let why = refused.expect("the second request is refused");
                assert!(why.contains("ticket 7"), "{why}");
                assert_eq!(space.count(&t).unwrap(), 1, "one tuple taken, one left");
                space.in_(&t).unwrap();
            }
            rt.dsm().barrier().unwrap();
        });
    }

    #[test]
    fn a_completion_leases_the_tuple_of_no_field_at_its_home_on_another_rank() {
        crate::local::run_local_job(2, 3, |rt| {
            let space = TupleSpace::join(rt).unwrap();
            // The rank that is not the home of the tuple of no field completes a lease homed there.
            let home = space.home_of(None, 0);
            if rt.rank() != home {
                let name = (0..)
                    .map(|i| format!("e{i}"))
                    .find(|n| space.home_of(Some(&Value::Str(n.clone())), 2) == home)
                    .unwrap();
                space.out(crate::tuple!(name.clone(), 1i64)).unwrap();
                let lease = space.in_leased(&crate::template!(name, ?i64)).unwrap();
                space.out(crate::tuple!()).unwrap();
                let next = space
                    .complete_and_lease(lease, Vec::new(), &crate::template!())
                    .unwrap();
                assert_eq!(next.tuple, crate::tuple!());
                space.complete(next, Vec::new()).unwrap();
                assert_eq!(space.count(&crate::template!()).unwrap(), 0);
            }
            rt.dsm().barrier().unwrap();
        });
    }

    /// A home that answers a waiting find with "not found", which only a deadline allows.
    #[derive(Debug)]
    struct Empty;

    impl dsm::Service for Empty {
        fn request(&self, _from: Rank, _payload: Vec<u8>, reply: dsm::Responder) {
            let _ = reply.send(&[&postcard::to_allocvec(&Answer::TimedOut).unwrap()]);
        }
    }

    #[test]
    fn a_home_answering_a_wait_without_a_deadline_with_nothing_is_named() {
        crate::local::run_local_job(2, 3, |rt| {
            if rt.rank() == Rank(1) {
                let dsm = rt.shared_dsm();
                dsm.register_service(SERVICE, Arc::new(Empty)).unwrap();
                dsm.barrier().unwrap(); // the barrier that ends rank 0's join
            } else {
                let space = TupleSpace::join(rt).unwrap();
                let t = crate::template!(homed_at_rank_1(&space, "n"), ?i64);
                // With a deadline, nothing is an answer; without one, it is the home's error.
                assert_eq!(space.rd_timeout(&t, Duration::from_secs(5)).unwrap(), None);
                match space.in_(&t) {
                    Err(RuntimeError::Dsm(dsm::DsmError::Protocol { rank, what })) => {
                        assert_eq!(rank, Rank(1));
                        assert!(what.contains("TimedOut"), "{what}");
                    }
                    other => panic!("an empty answer to a wait without a deadline: {other:?}"),
                }
            }
            rt.dsm().barrier().unwrap();
        });
    }

    #[test]
    fn a_found_tuple_that_does_not_match_its_template_is_an_error_and_its_lease_goes_back() {
        let liar = Arc::new(Liar::default());
        let seen = liar.clone();
        crate::local::run_local_job(2, 3, move |rt| {
            if rt.rank() == Rank(1) {
                let dsm = rt.shared_dsm();
                dsm.register_service(SERVICE, liar.clone()).unwrap();
                dsm.barrier().unwrap(); // the barrier that ends rank 0's join
            } else {
                let space = TupleSpace::join(rt).unwrap();
                let name = homed_at_rank_1(&space, "t");
                let t = crate::template!(name, ?i64);
                let results = [
                    space.inp(&t).map(|_| ()),
                    space.in_(&t).map(|_| ()),
                    space.rd_timeout(&t, Duration::from_secs(5)).map(|_| ()),
                    space.in_leased(&t).map(|_| ()),
                ];
                for result in results {
                    match result {
                        Err(RuntimeError::Dsm(dsm::DsmError::Protocol { rank, what })) => {
                            assert_eq!(rank, Rank(1));
                            assert!(what.contains("\"not\""), "the tuple is named: {what}");
                        }
                        other => panic!("a tuple that does not match was taken: {other:?}"),
                    }
                }
            }
            rt.dsm().barrier().unwrap();
        });
        assert_eq!(
            *seen.given_back.lock().unwrap(),
            vec![7],
            "the lease went back"
        );
    }
}
