"""Temporary bans with exponential backoff, offline."""

from __future__ import annotations

from efedllm.client.bans import BanList


def test_bans_end_and_grow_with_repeated_failures():
    bans = BanList(base_s=10.0, max_s=35.0)
    assert bans.ban("s", now=0.0) == 10.0
    assert bans.banned(5.0) == {"s"} and bans.banned(10.5) == set()
    assert bans.ban("s", now=11.0) == 20.0
    assert bans.ban("s", now=32.0) == 35.0  # capped


def test_a_success_after_the_ban_forgives_past_failures():
    bans = BanList(base_s=10.0)
    bans.ban("s", now=0.0)
    bans.succeeded("s", now=5.0)  # still banned: does not count
    assert bans.banned(6.0) == {"s"}
    bans.succeeded("s", now=11.0)
    assert bans.ban("s", now=12.0) == 10.0
