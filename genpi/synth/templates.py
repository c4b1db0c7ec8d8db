"""The generator's wording: requests for pseudo inputs and for reasons.

The conversations every stage shares (teacher, student, environment persona, Prompt
Generation) are in :mod:`genpi.prompt.views`.
"""

from __future__ import annotations

from genpi.chat import Conversation
from genpi.prompt.spec import PromptSpec


def input_request(spec: PromptSpec, demos: list[str], count: int) -> Conversation:
    """Ask the generator for ``count`` new user inputs the application could receive.

    The answer is prefilled with the examples as the start of a numbered list, so the generator
    only continues the list from item ``len(demos) + 1``: even a small generator then writes
    requests shaped like the examples instead of commentary, code or a new task of its own."""
    return [
        {"role": "system", "content": "You invent realistic requests that users send to an AI application."},
        {
            "role": "user",
            "content": (
                "Here is the full prompt the application always sends to its assistant:\n"
                f"<<<\n{spec.text()}\n>>>\n\n"
                f"Write a numbered list of {len(demos) + count} requests that users send to this application, one "
                "per line. Make each one concrete, self-contained and different from the others."
            ),
        },
        {
            "role": "assistant",
            "content": "".join(f"{i}. {' '.join(d.split())}\n" for i, d in enumerate(demos, 1)) + first_new_item(demos),
        },
    ]


def first_new_item(demos: list[str]) -> str:
    """Where the prefilled list of :func:`input_request` stops: the number of its first new item."""
    return f"{len(demos) + 1}."


def reason_request(spec: PromptSpec, user_input: str, as_is: str, to_be: str, sentences: int) -> Conversation:
    """Ask the generator why the prompt turns the AS-IS answer into the TO-BE answer."""
    return [
        {"role": "system", "content": "You explain how an application's prompt changes an assistant's answers."},
        {
            "role": "user",
            "content": (
                f"Application prompt:\n<<<\n{spec.text()}\n>>>\n\n"
                f"User input:\n{user_input}\n\n"
                f"AS-IS answer (the assistant without the prompt):\n{as_is}\n\n"
                f"TO-BE answer (the assistant with the prompt):\n{to_be}\n\n"
                f"In about {sentences} sentences, explain why, given the prompt, the answer should change from "
                "AS-IS to TO-BE. Point to the instructions, formats or examples of the prompt that cause each "
                "change. Write only the explanation."
            ),
        },
    ]
