//! Leases: a tuple taken under a lease stays reserved at its home until the taker completes it (its
//! results go out in the same message), gives it back, or fails, when the home puts it back into the
//! space. The task farm takes its tasks this way, so that a task taken by a rank that dies is done by
//! another.

use super::{home_of, Inner, TupleSpace, Wait};
use crate::tuple::{Template, Tuple};
use crate::tuple_home::{too_many_templates, Answer, Ask, Found};
use crate::tuple_store::Mode;
use crate::RuntimeError;
use dsm::Rank;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a worker's wait for its next task holds a wait channel before it gives the channel up and asks
/// again (see `Inner::complete`).
const COMPLETE_WAIT_SLICE: Duration = Duration::from_millis(20);

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
    pub(super) id: u64,
    /// Until the lease ends, the space that granted it, to give the tuple back to if it is dropped: held,
    /// so that it can be, even once every handle on the space is gone.
    pub(super) space: Option<Arc<Inner>>,
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

impl TupleSpace {
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

impl Inner {
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

    /// Asks `home` (another rank) to put back the tuples this rank holds there under `leases`.
    pub(super) fn give_back_at(&self, home: Rank, leases: Vec<u64>) -> Result<(), RuntimeError> {
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
}
