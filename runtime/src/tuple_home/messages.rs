//! What ranks ask a tuple-space home and what it answers (postcard-encoded service requests), with the
//! limits a home enforces on a peer's request.

use super::Found;
use crate::tuple::{Template, Tuple};
use dsm::ServiceId;
use serde::{Deserialize, Serialize};

/// The most tuples beyond the first that one `Complete` may lease (`TaskFarm` asks for far fewer).
pub(super) const MAX_MORE: u32 = 1024;

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
pub(super) fn next_refused(next: Option<&(Vec<Template>, u64)>) -> Option<String> {
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

impl From<Found> for Answer {
    fn from(f: Found) -> Answer {
        Answer::Found {
            tuple: f.tuple,
            lease: f.lease,
        }
    }
}

/// The most templates a completion may lease its next tuple with (each is looked up, and waited on when
/// nothing matches: a peer's request must not cost the home far more than its own size). The task farm
/// asks with a few more than there are ranks.
pub(crate) const MAX_NEXT_TEMPLATES: usize = 1024;
