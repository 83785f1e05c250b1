//! The limit on live regions in one process (a test binary of its own: the table of regions the fault
//! handler searches is the process's, and other tests' regions would take slots meanwhile).

use dsm::{Dsm, Placement};

/// Whether the process maps `addr` readable or writable (`/proc/self/maps`).
fn accessible(addr: usize) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            return false;
        };
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).unwrap(),
            usize::from_str_radix(hi, 16).unwrap(),
        );
        (lo..hi).contains(&addr) && (perms.starts_with('r') || perms[1..].starts_with('w'))
    })
}

#[test]
fn a_region_past_the_limit_is_refused_and_leaves_its_range_inaccessible() {
    let dsm = Dsm::builder().build().expect("a job of one rank");
    let mut regions = Vec::new();
    let refused = loop {
        match dsm.alloc(4096, Placement::Cyclic) {
            Ok(r) => regions.push(r),
            Err(e) => break e,
        }
        assert!(regions.len() <= 4096, "no limit on live regions");
    };
    assert_eq!(regions.len(), 256);
    let text = refused.to_string();
    assert!(text.contains("live regions"), "{text}");
    // The refused region would have come next in the arena: its range is back to the reservation.
    let last = regions.last().unwrap();
    let next = last.addr().0 + last.len();
    assert!(
        !accessible(next),
        "the refused region's range {next:#x} is still mapped"
    );
    assert!(accessible(last.addr().0));
    // A slot given back is taken again.
    regions.pop();
    let again = dsm.alloc_vec::<u64>(512).unwrap();
    again.set(3, 9);
    assert_eq!(again.get(3), 9);
}
