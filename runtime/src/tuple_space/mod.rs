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
//! Taking a tuple under a lease, and completing or giving back what was leased, is in `lease`.
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
use crate::tuple_home::{Answer, Ask, EvalJob, Found, Function, Home, MAX_QUEUED_EVALS, SERVICE};
use crate::tuple_store::Mode;
use crate::{Runtime, RuntimeError};
use dsm::{Dsm, Rank};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod lease;

pub use lease::Lease;

/// The largest batch of tuples one `out_many` message carries, in encoded bytes (a bigger batch is split).
const MAX_BATCH_BYTES: usize = 4 << 20;

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
mod tests;
