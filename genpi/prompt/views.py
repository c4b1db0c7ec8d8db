"""The conversations built from a prompt, one copy for synthesis, training and evaluation.

- teacher: the prompt's turns with the input appended (what the model sees with the prompt);
  with role-played turns after it, the teacher view of a training conversation;
- student: the input alone, no prompt (what the adapter must answer from);
- environment persona: the prompt's instructions and worked examples, roles swapped;
- Prompt Generation: the input and both answers in, the prompt (verbatim) and the reason out.

Every function returns chat messages or plain text.
"""

from __future__ import annotations

from collections.abc import Sequence

from genpi.chat import Conversation
from genpi.prompt.spec import PromptSpec

PG_REASON_HEADER = "### Why the answer changes"
NO_REASON = "none"  # a record's reason_finish when synthesis gave it no reason (synth.reason_fraction)


def teacher_messages(spec: PromptSpec, user_input: str, turns: Sequence[dict] = ()) -> Conversation:
    """The prompt's turns with ``user_input`` appended to its last user turn (or as a new one),
    then role-played ``turns`` (as :func:`student_messages` lays them out)."""
    return with_turns(spec.messages_with_input(user_input), turns)


def student_messages(user_input: str, turns: Sequence[dict] = ()) -> Conversation:
    """The input alone, no prompt, then role-played ``turns`` as training uses them."""
    return with_turns([{"role": "user", "content": user_input}], turns)


def with_turns(opening: Conversation, turns: Sequence[dict]) -> Conversation:
    """``opening`` followed by ``turns``: each turn's agent text is an assistant turn and its
    observation the next user turn; the last turn's observation is left out (nothing answers it)."""
    messages: Conversation = list(opening)
    for k, turn in enumerate(turns):
        messages.append({"role": "assistant", "content": turn["agent"]})
        if turn["observation"] and k + 1 < len(turns):
            messages.append({"role": "user", "content": turn["observation"]})
    return messages


def prompt_instructions(spec: PromptSpec) -> str:
    """The turn that holds the agent's instructions: the system turn if there is one, else the
    first user turn (with a system turn, the first user turn is an example task, left out)."""
    return next((t.content for t in spec.turns if t.role in ("system", "user")), "")


def example_episodes(spec: PromptSpec) -> list[tuple[str, list[tuple[str, str]]]]:
    """The prompt's worked examples as episodes: ``(task, [(action, observation), ...])``.

    An episode starts at the prompt's first user turn and after each final action; its task is
    that user turn. A final action matches the prompt's ``final`` regexes or is the prompt's last
    assistant turn (the user turn after it, if any, leads in the live input: no observation).
    A final action's observation is "" (the user turn after it is the next task). Without
    ``final`` regexes the worked examples are one episode.
    """
    fmt = spec.action_format
    last = max((i for i, t in enumerate(spec.turns) if t.role == "assistant"), default=-1)
    episodes: list[tuple[str, list[tuple[str, str]]]] = []
    task, starting = "", True
    for i, turn in enumerate(spec.turns):
        if turn.role == "user" and starting:
            task = turn.content
        if turn.role != "assistant":
            continue
        following = spec.turns[i + 1].content if i + 1 < len(spec.turns) else ""
        final = i == last or (fmt.has_final and fmt.is_final(turn.content))
        if starting:
            episodes.append((task, []))
        episodes[-1][1].append((turn.content, "" if final else following))
        starting = final
    return episodes


def environment_system(spec: PromptSpec) -> str:
    """System message that makes the target model play the agent's environment."""
    env = spec.environment
    return (
        "You are not an assistant. You simulate the environment an AI agent acts in. "
        f"{env.description}\n\n"
        f"The agent was given these instructions:\n<<<\n{prompt_instructions(spec)}\n>>>\n\n"
        "Every message you receive is the agent's latest action; the first one of an episode comes with "
        "the agent's task. Reply with exactly what the environment returns for that action (command "
        "output, page text, tool result), without commentary and without acting for the agent. The "
        f"episode is over when {env.end_condition}; then reply with {env.end_token} and nothing else."
    )


def environment_opening(user_input: str, action: str) -> str:
    """The environment's first user turn of an episode: the task, then the agent's first action."""
    return f"A new episode starts. The agent's task: {user_input}\n\n{action}"


def environment_conversation(spec: PromptSpec) -> Conversation:
    """The environment persona's context: the prompt's worked examples with the roles swapped.

    The agent's example turns become the persona's user turns (an episode's first one opened
    with :func:`environment_opening`, as live episodes are) and the observations that followed
    them its own turns; an episode's final action is answered with the end token. The same for
    every input, so a batch shares it as one cached prefix.
    """
    messages: Conversation = [{"role": "system", "content": environment_system(spec)}]
    for task, exchanges in example_episodes(spec):
        for k, (action, observation) in enumerate(exchanges):
            said = environment_opening(task, action) if k == 0 else action
            messages.append({"role": "user", "content": said})
            messages.append({"role": "assistant", "content": observation or spec.environment.end_token})
    return messages


def prompt_generation_input(user_input: str, student: str, teacher: str) -> str:
    """The user turn of a Prompt Generation example: the input and both answers."""
    return (
        f"User input:\n{user_input}\n\n"
        f"AS-IS answer (without the instructions):\n{student}\n\n"
        f"TO-BE answer (with the instructions):\n{teacher}\n\n"
        "Write the instructions that turn the AS-IS answer into the TO-BE answer, then explain why."
    )


def prompt_generation_target(spec: PromptSpec, reason: str) -> str:
    """The assistant turn of a Prompt Generation example: the prompt the teacher saw, then the reason.

    Every turn's content appears verbatim and in order (:meth:`PromptSpec.text`); the input,
    appended only at run time, is not part of it.
    """
    return f"{spec.text()}\n\n{PG_REASON_HEADER}\n{reason}"
