"""The examples of LiteLLM's Budget Manager page (shared/reference/002_…), run as scripts with
only their import line changed, against the fake upstream (OPENAI_BASE_URL) and, for the
hosted examples, the sidecar (RATELIMITER_URL, RATELIMITER_MASTER_KEY)."""

# ruff: noqa: E501  (the examples keep the documentation's long lines)

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ratelimiter.gateway.config import Settings

from ..conftest import MASTER_KEY, running_sidecar, running_upstream
from .test_budget_manager import run_python

QUICK_START = """\
import ratelimiter as litellm, os
from ratelimiter import completion

# set env variable
os.environ["OPENAI_API_KEY"] = "your-api-key"

litellm.max_budget = 0.001 # sets a max budget of $0.001

messages = [{"role": "user", "content": "Hey, how's it going"}]
completion(model="gpt-4", messages=messages)
print(litellm._current_cost)
completion(model="gpt-4", messages=messages)
"""

USER_BASED = """\
from ratelimiter import BudgetManager, completion

budget_manager = BudgetManager(project_name="test_project")

user = "1234"

# create a budget if new user user
if not budget_manager.is_valid_user(user):
    budget_manager.create_budget(total_budget=10, user=user)

# check if a given call can be made
if budget_manager.get_current_cost(user=user) <= budget_manager.get_total_budget(user):
    response = completion(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hey, how's it going?"}])
    budget_manager.update_cost(completion_obj=response, user=user)
else:
    response = "Sorry - no budget!"
"""

TEXT_IN_OUT = """\
from ratelimiter import BudgetManager

budget_manager = BudgetManager(project_name="test_project")
user = "12345"
budget_manager.create_budget(total_budget=10, user=user, duration="daily")

input_text = "hello world"
output_text = "it's a sunny day in san francisco"
model = "gpt-3.5-turbo"

budget_manager.update_cost(user=user, model=model, input_text=input_text, output_text=output_text) # 👈
print(budget_manager.get_current_cost(user))
"""

HOSTED = """\
from ratelimiter import BudgetManager, completion

budget_manager = BudgetManager(project_name="<my-unique-project>", client_type="hosted")

user = "1234"

# create a budget if new user user
if not budget_manager.is_valid_user(user):
    budget_manager.create_budget(total_budget=10, user=user, duration="monthly") # 👈 duration = 'daily'/'weekly'/'monthly'/'yearly'

# check if a given call can be made
if budget_manager.get_current_cost(user=user) <= budget_manager.get_total_budget(user):
    response = completion(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hey, how's it going?"}])
    budget_manager.update_cost(completion_obj=response, user=user)
else:
    response = "Sorry - no budget!"
"""

# The self-hosted variant names its API "your_custom_api": that placeholder is the one other
# change, to the sidecar's URL.
SELF_HOSTED = HOSTED.replace(
    'client_type="hosted")', 'client_type="hosted", api_base="your_custom_api")'
)

GPT35 = (0.5e-6, 1.5e-6)


def chat_cost(prompt_chars: int, price: tuple[float, float], completion_tokens: int = 16) -> float:
    return -(-prompt_chars // 4) * price[0] + completion_tokens * price[1]


async def test_quick_start_stops_the_second_call(tmp_path: Path) -> None:
    async with running_upstream() as upstream:
        code, out, err = await run_python(QUICK_START, tmp_path, {"OPENAI_BASE_URL": upstream})
    first = chat_cost(len("Hey, how's it going"), (30e-6, 60e-6))
    assert first > 0.001  # one gpt-4 call spends the whole budget...
    assert float(out) == pytest.approx(first)
    assert code == 1 and "BudgetExceededError: Budget has been exceeded!" in err  # ...the next


@pytest.mark.parametrize("example", [USER_BASED, TEXT_IN_OUT], ids=["user-based", "text"])
async def test_local_examples_write_user_cost_json(tmp_path: Path, example: str) -> None:
    async with running_upstream() as upstream:
        code, out, err = await run_python(example, tmp_path, {"OPENAI_BASE_URL": upstream})
    assert code == 0, err
    users = json.loads((tmp_path / "user_cost.json").read_text())
    if example is USER_BASED:
        expected = chat_cost(len("Hey, how's it going?"), GPT35)
        assert users["1234"]["current_cost"] == pytest.approx(expected)
        assert users["1234"]["model_cost"] == {"gpt-3.5-turbo": pytest.approx(expected)}
    else:
        expected = 3 * GPT35[0] + 9 * GPT35[1]
        assert float(out) == pytest.approx(expected)
        assert users["12345"]["duration"] == "daily"


@pytest.mark.parametrize("example", [HOSTED, SELF_HOSTED], ids=["hosted", "self-hosted"])
async def test_hosted_examples_keep_budgets_in_the_sidecar(
    tmp_path: Path, ns: str, redis_url: str, example: str
) -> None:
    settings = Settings(master_key=MASTER_KEY, key_prefix=f"t:{ns}:")
    async with running_upstream() as upstream, running_sidecar(settings, redis_url) as base:
        env = {
            "OPENAI_BASE_URL": upstream,
            "RATELIMITER_URL": base,
            "RATELIMITER_MASTER_KEY": MASTER_KEY,
        }
        script = example.replace("your_custom_api", base)
        for _ in range(2):  # the second run finds the user the first one created
            code, _, err = await run_python(script, tmp_path, env)
            assert code == 0, err
        check = (
            "from ratelimiter import BudgetManager\n"
            "m = BudgetManager(project_name='<my-unique-project>', client_type='hosted')\n"
            "print(m.get_current_cost('1234'), m.user_dict['1234']['duration'])\n"
        )
        code, out, err = await run_python(check, tmp_path, env)
    assert code == 0, err
    cost, duration = out.split()
    assert float(cost) == pytest.approx(2 * chat_cost(len("Hey, how's it going?"), GPT35))
    assert duration == "monthly"
    assert not (tmp_path / "user_cost.json").exists()
