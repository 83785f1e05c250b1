//! A home's state: its tuple store, the requests waiting on it (alone or in groups of several templates),
//! and the leases of tuples taken by the task farm. Changed only under the home's lock; the answers it
//! makes are collected in an [`Outbox`] and sent after the lock is released.

use super::{Answer, Found, Outbox};
use crate::tuple::{Template, Tuple, TupleError, MAX_TUPLE_BYTES};
use crate::tuple_store::{Delivery, Mode, TupleStore, WaiterId};
use crossbeam::channel::Sender;
use dsm::{Rank, Responder};
use std::collections::{HashMap, HashSet};

#[derive(Debug)]
pub(super) enum Waiter {
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
pub(super) struct Group {
    waiter: Waiter,
    holder: Rank,
    members: Vec<WaiterId>,
}

#[derive(Debug)]
pub(super) struct Pending {
    waiter: Waiter,
    holder: Rank,
    lease: bool,
}

#[derive(Debug, Default)]
pub(super) struct State {
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
pub(super) enum Ticketed {
    /// In `pending`, as this store waiter.
    Waiter(WaiterId),
    /// In `groups`, as this group.
    Group(u64),
}

impl State {
    /// Withdraws the local waiter `id`. False when it was already served: its tuple is in its receiver.
    pub(super) fn cancel(&mut self, id: WaiterId) -> bool {
        self.pending.remove(&id);
        self.store.cancel(id)
    }

    /// The number of tuples here matching `template`.
    pub(super) fn count(&self, template: &Template) -> usize {
        self.store.count(template)
    }

    /// Whether `rank` was seen failing (`forget`).
    pub(super) fn has_failed(&self, rank: Rank) -> bool {
        self.failed.contains(&rank)
    }

    /// Ends lease `id` (its tuple leaves the space: the holder took it).
    pub(super) fn end_lease(&mut self, id: u64) {
        self.leases.remove(&id);
    }

    /// Forgets the failed `rank`: its waiting requests, alone or in groups, and its leases, whose tuples
    /// it returns (to go back into the space); its late requests will be refused.
    pub(super) fn forget(&mut self, rank: Rank) -> Vec<Tuple> {
        self.failed.insert(rank);
        let gone: Vec<WaiterId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.holder == rank)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.pending.remove(&id);
            self.store.cancel(id);
        }
        self.groups.retain(|_, g| g.holder != rank);
        self.tickets.retain(|(holder, _), _| *holder != rank);
        let held: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, (h, _))| *h == rank)
            .map(|(id, _)| *id)
            .collect();
        held.into_iter()
            .filter_map(|id| self.leases.remove(&id).map(|(_, tuple)| tuple))
            .collect()
    }

    pub(super) fn grant(&mut self, holder: Rank, tuple: Tuple, lease: bool) -> Found {
        let lease = lease.then(|| {
            self.next_lease += 1;
            self.leases.insert(self.next_lease, (holder, tuple.clone()));
            self.next_lease
        });
        Found { tuple, lease }
    }

    pub(super) fn out(&mut self, tuple: Tuple, outbox: &mut Outbox) -> Result<(), TupleError> {
        for d in self.store.out(tuple)? {
            self.deliver(d, outbox)?;
        }
        Ok(())
    }

    /// Adds several tuples in one step. A request waiting on several templates (a worker of the task
    /// farm: its own tasks first, then anyone's, then other ranks') gets the tuple it prefers among those
    /// the batch brings, not the first of the batch that it matches: a worker already waiting when the
    /// master puts every rank's tasks at once still starts with its own.
    pub(super) fn out_many(
        &mut self,
        tuples: Vec<Tuple>,
        outbox: &mut Outbox,
    ) -> Result<(), TupleError> {
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
    pub(super) fn deliver(&mut self, d: Delivery, outbox: &mut Outbox) -> Result<(), TupleError> {
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
    pub(super) fn take_pending(&mut self, id: WaiterId) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if let Waiter::Remote { ticket, .. } = p.waiter {
            self.tickets.remove(&(p.holder, ticket));
        }
        Some(p)
    }

    /// Withdraws every member of group `g` still waiting; returns the group.
    pub(super) fn dissolve(&mut self, g: u64) -> Option<Group> {
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
    pub(super) fn ticket_refused(&self, from: Rank, ticket: u64) -> Option<String> {
        self.tickets.contains_key(&(from, ticket)).then(|| {
            format!("{from} has a request waiting under ticket {ticket} already: a rank's tickets must be unique")
        })
    }

    /// Withdraws `from`'s request waiting under `ticket`; returns its responder, which the caller answers
    /// `TimedOut`. `None` when it waits no more (it was served, and its answer is on the way).
    pub(super) fn withdraw(&mut self, from: Rank, ticket: u64) -> Option<Responder> {
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
    pub(super) fn wait_any(
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
    pub(super) fn find(
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
    pub(super) fn wait(
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
    pub(super) fn find_for(
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
    pub(super) fn complete(
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
    pub(super) fn end_leases(
        &mut self,
        holder: Rank,
        leases: &[u64],
    ) -> Result<Vec<Tuple>, String> {
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
    pub(super) fn give_back(
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
    pub(super) fn lease_first(
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

#[cfg(test)]
impl State {
    /// How many requests wait here: alone (each template of a group counts too), and in groups.
    pub(super) fn waiting(&self) -> (usize, usize) {
        (self.pending.len(), self.groups.len())
    }

    /// The leases held, by id.
    pub(super) fn leases(&self) -> &HashMap<u64, (Rank, Tuple)> {
        &self.leases
    }
}
