//! The SWMR protocol's decisions one by one; the simulation of whole jobs (`sim`) and the randomized
//! interleavings run on it (`randomized`) are in the modules.

use super::*;

mod randomized;
mod sim;

#[test]
fn copyset_set_operations() {
    let mut s = CopySet::EMPTY;
    assert!(s.is_empty());
    s.insert(Rank(3));
    s.insert(Rank(200));
    assert!(s.contains(Rank(3)) && s.contains(Rank(200)) && !s.contains(Rank(4)));
    assert_eq!(s.iter().collect::<Vec<_>>(), vec![Rank(3), Rank(200)]);
    s.remove(Rank(3));
    assert_eq!(s.iter().collect::<Vec<_>>(), vec![Rank(200)]);
}

#[test]
fn first_touch_gives_zeros_and_ownership() {
    let mut e = Entry::default();
    let d = decide(&mut e, Rank(0), Rank(1), Access::Read);
    assert_eq!(
        d,
        Decision::Done {
            home_action: HomeAction::None,
            data: Data::Zero
        }
    );
    assert_eq!(e.owner, Some(Rank(1)));
}

#[test]
fn write_by_a_reader_invalidates_the_other_readers_and_keeps_its_data() {
    let mut e = Entry {
        owner: Some(Rank(1)),
        copyset: CopySet::EMPTY,
    };
    e.copyset.insert(Rank(2));
    e.copyset.insert(Rank(0));
    let Decision::Grant(g) = decide(&mut e, Rank(0), Rank(2), Access::Write) else {
        panic!()
    };
    assert_eq!(g.home_action, HomeAction::Invalidate);
    assert_eq!(g.fetch_from, None, "the writer already holds the data");
    assert_eq!(g.invalidate.iter().collect::<Vec<_>>(), vec![Rank(1)]);
    complete(&mut e, Rank(2), Access::Write);
    assert_eq!(e.owner, Some(Rank(2)));
    assert!(e.copyset.is_empty());
}

#[test]
fn read_of_a_page_owned_by_its_home_is_answered_by_the_home() {
    let mut e = Entry {
        owner: Some(Rank(0)),
        copyset: CopySet::EMPTY,
    };
    let d = decide(&mut e, Rank(0), Rank(1), Access::Read);
    assert_eq!(
        d,
        Decision::Done {
            home_action: HomeAction::Downgrade,
            data: Data::Home
        }
    );
    assert!(e.copyset.contains(Rank(1)));
}

#[test]
fn a_page_handed_out_with_an_answer_that_never_arrived_is_withdrawn_to_what_it_was() {
    let home = Rank(0);
    let owned_by_home = {
        let mut e = Entry {
            owner: Some(home),
            copyset: CopySet::EMPTY,
        };
        e.copyset.insert(Rank(2));
        e
    };
    for (before, access) in [
        (Entry::default(), Access::Read),
        (Entry::default(), Access::Write),
        (owned_by_home, Access::Read),
    ] {
        let mut e = before;
        assert!(matches!(
            decide(&mut e, home, Rank(1), access),
            Decision::Done {
                data: Data::Zero | Data::Home,
                ..
            }
        ));
        assert_ne!(e, before, "{access:?} of {before:?} changed nothing");
        withdraw(&mut e, Rank(1));
        assert_eq!(e, before, "{access:?}");
    }
}

#[test]
fn ranks_that_left_leave_the_copyset_and_a_reader_takes_over_from_a_gone_owner() {
    let mut e = Entry {
        owner: Some(Rank(3)),
        copyset: CopySet::EMPTY,
    };
    for r in [1, 63, 64, 65, 200, 255] {
        e.copyset.insert(Rank(r));
    }
    assert_eq!(
        e.forget_gone(Rank(0), |r| [3, 63, 65, 255].contains(&r.0)),
        None
    );
    let left: Vec<u32> = e.copyset.iter().map(|r| r.0).collect();
    assert_eq!(left, vec![64, 200]);
    assert_eq!(
        e.owner,
        Some(Rank(1)),
        "the owner's read-only copy lives on at a reader"
    );
    // A write by rank 2 has no gone rank's copy dropped, and fetches the page from the new owner.
    match decide(&mut e, Rank(0), Rank(2), Access::Write) {
        Decision::Grant(g) => {
            assert_eq!(g.fetch_from, Some(Rank(1)));
            let asked: Vec<u32> = g.invalidate.iter().map(|r| r.0).collect();
            assert_eq!(asked, vec![64, 200]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_home_takes_over_from_a_gone_owner_whose_page_it_read() {
    // The owner wrote the page, the home read it, and the owner died: the home's copy is the page.
    let mut e = Entry {
        owner: Some(Rank(2)),
        copyset: CopySet::EMPTY,
    };
    e.copyset.insert(Rank(3));
    e.copyset.insert(Rank(0));
    assert_eq!(e.forget_gone(Rank(0), |r| r == Rank(2)), None);
    assert_eq!(e.owner, Some(Rank(0)));
    assert_eq!(e.copyset.iter().collect::<Vec<_>>(), vec![Rank(3)]);
    // A reader gets the home's copy, not a grant to fetch it from the dead rank.
    assert_eq!(
        decide(&mut e, Rank(0), Rank(1), Access::Read),
        Decision::Done {
            home_action: HomeAction::Downgrade,
            data: Data::Home
        }
    );
}

#[test]
fn a_gone_owner_with_the_only_copy_stays_the_owner_and_is_named_as_having_taken_the_data() {
    let mut e = Entry {
        owner: Some(Rank(2)),
        copyset: CopySet::EMPTY,
    };
    e.copyset.insert(Rank(3));
    let lost = e.forget_gone(Rank(0), |r| r == Rank(2) || r == Rank(3));
    assert_eq!(lost, Some(Rank(2)), "its copy was the only one");
    assert_eq!(e.owner, Some(Rank(2)));
    assert!(e.copyset.is_empty());
    // Pages nobody has touched, or whose owner lives, have lost nothing.
    assert_eq!(Entry::default().forget_gone(Rank(0), |_| true), None);
    let mut live = Entry {
        owner: Some(Rank(1)),
        copyset: CopySet::EMPTY,
    };
    assert_eq!(live.forget_gone(Rank(0), |r| r == Rank(2)), None);
}
