"""Post a benchmark summary on the merge request of a GitLab pipeline, replacing the previous one.

    python3 ci/gitlab/post_note.py bench-ci/summary.md

The summary's first line is a marker (``<!-- sdexport bench compare -->``), its second names the
scenario: the note of the token's own user that starts with both is updated in place, so a merge
request carries one comparison per scenario, the latest (a note someone else wrote, quoting the
summary, is left alone: the token could not edit it anyway). Needs
SDEXPORT_GITLAB_TOKEN (a project access token with the api scope; CI_JOB_TOKEN cannot write notes)
and GitLab's merge-request pipeline variables; without them it says why and does nothing. Standard
library only: it runs in ``after_script``, whatever the job installed.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


def _request(method: str, url: str, token: str, body: str | None = None) -> Any:
    data = None if body is None else urllib.parse.urlencode({"body": body}).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"PRIVATE-TOKEN": token})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


PAGES = 10
"""How many pages of 100 notes are searched for the one to update (a busy merge request's)."""


def key_of(summary: str) -> str:
    """What this tool's note for the same scenario starts with: the marker line, and the scenario's
    line after it where there is one (summaries written before it had the marker alone; since
    2026-12-07 the line names the baseline too, so one scenario gated on two runners' baselines
    keeps a note each)."""
    lines = summary.split("\n", 2)
    if len(lines) > 1 and lines[1].startswith("<!-- sdexport bench scenario:"):
        return "\n".join(lines[:2])
    return lines[0]


def post(summary: str, api: str, project: str, merge_request: str, token: str) -> str:
    """Update this tool's note on the merge request, or add one; returns what was done."""
    notes_url = f"{api}/projects/{urllib.parse.quote(project, safe='')}/merge_requests/{merge_request}/notes"
    marker = key_of(summary)
    me = _request("GET", f"{api}/user", token).get("id")  # (a project access token is a bot user)
    previous = None
    for page in range(1, PAGES + 1):  # the most recently updated first: the bot's own is near the top
        notes = _request("GET", f"{notes_url}?per_page=100&page={page}&sort=desc&order_by=updated_at", token)
        previous = next((n for n in notes if str(n.get("body", "")).startswith(marker)
                         and (n.get("author") or {}).get("id") == me), None)
        if previous is not None or len(notes) < 100:
            break
    if previous is not None:
        _request("PUT", f"{notes_url}/{previous['id']}", token, summary)
        return f"updated note {previous['id']}"
    created = _request("POST", notes_url, token, summary)
    return f"added note {created.get('id')}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: post_note.py SUMMARY.md", file=sys.stderr)
        return 2
    path = Path(argv[0])
    env = os.environ
    missing = [name for name in ("SDEXPORT_GITLAB_TOKEN", "CI_API_V4_URL", "CI_PROJECT_ID", "CI_MERGE_REQUEST_IID")
               if not env.get(name)]
    if missing:
        print(f"post_note: not posting ({', '.join(missing)} not set: not a merge-request pipeline, or no token)")
        return 0
    if not path.is_file():
        print(f"post_note: no {path} (the job stopped before writing it)")
        return 0
    try:
        done = post(path.read_text(encoding="utf-8"), env["CI_API_V4_URL"], env["CI_PROJECT_ID"],
                    env["CI_MERGE_REQUEST_IID"], env["SDEXPORT_GITLAB_TOKEN"])
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"post_note: could not post the summary: {exc}", file=sys.stderr)
        return 1
    print(f"post_note: {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
