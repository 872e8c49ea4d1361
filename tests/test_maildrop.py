"""The login snapshot: numbering, deletion marks, what STAT/LIST/UIDL/Update see."""

from __future__ import annotations

import pytest

from pop3proto import Maildrop, MessageInfo
from pop3proto._maildrop import valid_uid


def info(n: int, size: int = 10) -> MessageInfo:
    return MessageInfo(key=f"k{n}", size=size, uid=f"u{n}")


@pytest.fixture
def drop() -> Maildrop:
    return Maildrop([info(1, 100), info(2, 20), info(3, 3), info(4, 2)])


@pytest.mark.parametrize(
    ("uid", "valid"),
    [
        ("a", True),
        ("x" * 70, True),
        ("!~" * 35, True),
        ("QhdPYR:00WBw1Ph7x7", True),
        ("", False),
        ("x" * 71, False),
        ("a b", False),
        ("a\tb", False),
        ("a\x7fb", False),
        ("é", False),
    ],
)
def test_valid_uid(uid: str, valid: bool) -> None:
    assert valid_uid(uid) is valid


def test_message_info_checks_its_fields() -> None:
    assert MessageInfo(key="k", size=5, uid="u").size == 5
    with pytest.raises(ValueError, match="negative message size"):
        MessageInfo(key="k", size=-1, uid="u")
    with pytest.raises(ValueError, match="invalid UIDL"):
        MessageInfo(key="k", size=1, uid="a b")


def test_an_empty_message_is_listed_at_the_size_retr_sends() -> None:
    # RETR sends an empty message as one empty line (CRLF): a store that measured
    # the file as 0 octets must not make LIST and STAT disagree with RETR.
    assert MessageInfo(key="k", size=0, uid="u").size == 2
    assert MessageInfo(key="k", size=3, uid="u").size == 3


def test_numbering_and_totals(drop: Maildrop) -> None:
    assert drop.count == 4
    assert drop.octets == 125
    assert drop.get(1) == info(1, 100)
    assert drop.get(4) == info(4, 2)
    for number in (0, 5, -1):
        assert drop.get(number) is None
        assert not drop.exists(number)
    assert [n for n, _ in drop.live()] == [1, 2, 3, 4]
    assert drop.deleted_keys() == ()


def test_marks_hide_messages_and_keep_numbers(drop: Maildrop) -> None:
    drop.mark(2)
    assert drop.get(2) is None
    assert drop.exists(2)
    assert drop.get(3) == info(3, 3)
    assert drop.count == 3
    assert drop.octets == 105
    assert drop.live() == [(1, info(1, 100)), (3, info(3, 3)), (4, info(4, 2))]


def test_deleted_keys_are_in_number_order(drop: Maildrop) -> None:
    for number in (4, 1, 3):
        drop.mark(number)
    assert drop.deleted_keys() == ("k1", "k3", "k4")
    assert drop.deleted == {1, 3, 4}
    assert drop.count == 1
    assert drop.octets == 20


def test_reset_unmarks_everything(drop: Maildrop) -> None:
    drop.mark(1)
    drop.mark(2)
    drop.reset()
    assert drop.count == 4
    assert drop.octets == 125
    assert drop.deleted_keys() == ()
    assert drop.get(1) == info(1, 100)


@pytest.mark.parametrize("number", [0, -1, 5])
def test_mark_refuses_absent_messages(drop: Maildrop, number: int) -> None:
    with pytest.raises(ValueError, match="absent or already marked"):
        drop.mark(number)
    assert drop.count == 4
    assert drop.octets == 125
    assert drop.deleted == set()


def test_mark_refuses_marked_messages(drop: Maildrop) -> None:
    drop.mark(1)
    with pytest.raises(ValueError, match="absent or already marked"):
        drop.mark(1)
    assert drop.count == 3
    assert drop.octets == 25


def test_empty_maildrop() -> None:
    drop = Maildrop()
    assert drop.messages == ()
    assert (drop.count, drop.octets) == (0, 0)
    assert drop.live() == []
    drop.reset()
    assert drop.count == 0


def test_list_and_tuple_give_the_same_snapshot() -> None:
    messages = [info(1), info(2)]
    assert Maildrop(messages) == Maildrop(tuple(messages))
    assert Maildrop(messages).messages == tuple(messages)
