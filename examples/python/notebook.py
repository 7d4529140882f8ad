"""A data scientist's session with DataAPI, as a script: counts per language and day into a DataFrame,
the consent rate, every German message as a typed DataFrame from the Parquet export, and a local copy
kept in step by the change feed. Run it cell by cell in a notebook, or whole:

    DATAAPI_URL=http://localhost:8000 DATAAPI_KEY=dak_… python notebook.py

Needs pandas and pyarrow. The test suite runs it against a live service.
"""
import io
import json
import os
import urllib.request

import pandas as pd

BASE = os.environ.get("DATAAPI_URL", "http://localhost:8000")
KEY = os.environ.get("DATAAPI_KEY")
AUTH = {"Authorization": f"Bearer {KEY}"} if KEY else {}


def graphql(query, **variables):
    """Runs one GraphQL operation; raises with the API's codes and messages on any error."""
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(
        f"{BASE}/graphql", body, {"Content-Type": "application/json", **AUTH}
    )
    with urllib.request.urlopen(request) as response:
        answer = json.load(response)
    if answer.get("errors"):
        raise RuntimeError([(e["extensions"]["code"], e["message"]) for e in answer["errors"]])
    return answer["data"]


# %% Messages and dialogs per language and day (Berlin time), as a table with a column per language.
stats = graphql(
    """query($zone: String!) {
         stats(groupBy: [LANGUAGE], bucket: DAY, timeZone: $zone) {
           language bucketStart messageCount dialogCount } }""",
    zone="Europe/Berlin",
)["stats"]
per_day = pd.DataFrame(stats).assign(day=lambda df: pd.to_datetime(df.bucketStart))
chart = per_day.pivot_table(index="day", columns="language", values="messageCount", fill_value=0)

# %% The consent rate, from the recorded decisions (it survives restarts).
totals = graphql("{ consentStats { granted refused withdrawn } }")["consentStats"][0]
decided = totals["granted"] + totals["refused"]
consent_rate = totals["granted"] / decided if decided else None

# %% Every German message, typed (createdAt is a timestamp), in one request.
request = urllib.request.Request(f"{BASE}/export/messages.parquet?language=de", headers=AUTH)
with urllib.request.urlopen(request) as response:
    german = pd.read_parquet(io.BytesIO(response.read()))

# %% A local copy kept in step by the change feed: remove what was removed, add what was stored.
copy, token = pd.DataFrame(columns=["id", "dialogId", "text"]), None
for _ in range(2):  # in a notebook: run this cell whenever you want to catch up
    after = f"?after={token}" if token else ""
    request = urllib.request.Request(f"{BASE}/export/changes.parquet{after}", headers=AUTH)
    with urllib.request.urlopen(request) as response:
        token = response.headers["DataAPI-Change-Token"]
        changes = pd.read_parquet(io.BytesIO(response.read()))
    removed = changes.loc[changes.kind != "stored", "dialogId"]
    stored = changes.loc[changes.kind == "stored", ["id", "dialogId", "text"]]
    copy = pd.concat([copy[~copy.dialogId.isin(removed)], stored], ignore_index=True)

print(json.dumps({
    "languages": sorted(chart.columns),
    "messages": int(chart.to_numpy().sum()),
    "consent_rate": consent_rate,
    "german": sorted(german.text),
    "german_created_at_is_time": str(german.createdAt.dtype).startswith("datetime64"),
    "copy": len(copy),
    "token": token,
}))
