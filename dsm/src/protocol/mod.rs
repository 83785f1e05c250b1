//! Coherence protocols as pure state machines: they take the manager's record of a page and a request and
//! return what must happen, with no I/O. The engine (`crate::engine`) and the fault path (`crate::fault`)
//! perform the actions. See `README.md` in this folder for states, messages and invariants.

pub mod diff;
pub mod release;
pub mod swmr;
