"""The wording GenPI sends to models: input generation, reasons, the environment persona,
and the Prompt Generation training example. Kept together so the wording is reviewed in
one place; every function returns chat messages or plain text.
"""

from __future__ import annotations

from genpi.engines.base import Conversation
from genpi.prompts import PromptSpec


def input_request(spec: PromptSpec, demos: list[str], count: int) -> Conversation:
    """Ask the generator for ``count`` new user inputs the application could receive."""
    shown = "\n".join(f"{i}. {d}" for i, d in enumerate(demos, 1)) or "(none given)"
    return [
        {"role": "system", "content": "You invent realistic requests that users send to an AI application."},
        {"role": "user", "content": (
            "Here is the full prompt the application always sends to its assistant:\n"
            f"<<<\n{spec.text()}\n>>>\n\n"
            f"Examples of requests users send to this application:\n{shown}\n\n"
            f"Write {count} new requests a user could send to this application. Make each one concrete, "
            "self-contained and different from the examples and from each other. Answer with a numbered "
            "list, one request per line, and nothing else.")},
    ]


def reason_request(spec: PromptSpec, user_input: str, as_is: str, to_be: str, sentences: int) -> Conversation:
    """Ask the generator why the prompt turns the AS-IS answer into the TO-BE answer."""
    return [
        {"role": "system", "content": "You explain how an application's prompt changes an assistant's answers."},
        {"role": "user", "content": (
            f"Application prompt:\n<<<\n{spec.text()}\n>>>\n\n"
            f"User input:\n{user_input}\n\n"
            f"AS-IS answer (the assistant without the prompt):\n{as_is}\n\n"
            f"TO-BE answer (the assistant with the prompt):\n{to_be}\n\n"
            f"In about {sentences} sentences, explain why, given the prompt, the answer should change from "
            "AS-IS to TO-BE. Point to the instructions, formats or examples of the prompt that cause each "
            "change. Write only the explanation.")},
    ]


def environment_system(spec: PromptSpec) -> str:
    """System message that makes the target model play the agent's environment."""
    env = spec.environment
    instructions = spec.turns[0].content
    return (
        "You are not an assistant. You simulate the environment an AI agent acts in. "
        f"{env.description}\n\n"
        f"The agent was given these instructions:\n<<<\n{instructions}\n>>>\n\n"
        "Every message you receive is the agent's latest action. Reply with exactly what the environment "
        "returns for that action (command output, page text, tool result), without commentary and without "
        f"acting for the agent. The episode is over when {env.end_condition}; then reply with "
        f"{env.end_token} and nothing else.")


def environment_conversation(spec: PromptSpec) -> Conversation:
    """The environment persona's context: the prompt's worked examples with the roles swapped.

    The agent's example turns become the persona's user turns and the observations that followed
    them become its own (assistant) turns; an episode's final action is answered with the end token.
    The same for every input, so a batch shares it as one cached prefix; the task comes with the
    first live turn (:func:`environment_opening`).
    """
    messages: Conversation = [{"role": "system", "content": environment_system(spec)}]
    for action, observation in spec.example_exchanges():
        final = not observation or spec.action_format.is_final(action)
        messages.append({"role": "user", "content": action})
        messages.append({"role": "assistant", "content": spec.environment.end_token if final else observation})
    return messages


def environment_opening(user_input: str, action: str) -> str:
    """The environment's first live user turn: the new episode's task, then the agent's first action."""
    return f"A new episode starts. The agent's task: {user_input}\n\n{action}"


def prompt_generation_input(user_input: str, student: str, teacher: str) -> str:
    """The user turn of a Prompt Generation example: the input and both answers."""
    return (f"User input:\n{user_input}\n\n"
            f"AS-IS answer (without the instructions):\n{student}\n\n"
            f"TO-BE answer (with the instructions):\n{teacher}\n\n"
            "Write the instructions that turn the AS-IS answer into the TO-BE answer, then explain why.")


def prompt_generation_target(prompt_text: str, reason: str) -> str:
    """The assistant turn of a Prompt Generation example: the prompt first, then the reason."""
    return f"{prompt_text}\n\n### Why the answer changes\n{reason}"
