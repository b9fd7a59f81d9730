"""Collaboration strategies between an SLM and an LLM, shared by evaluation and serving.

    cascade          COREA: one SLM answer; confidence c >= tau keeps it, else the LLM answers the question
    steer            STEER: per step, the SLM's logit confidence mapped by a 2-component GMM; below tau the LLM
                     writes that step from the same prefix and the SLM goes on after it
    stepwise_policy  a small MLP on step features (REINFORCE, reward = correct - lambda x cost) decides per step
    cope             planner/executor stages: SLM+SLM -> LLM plan + SLM -> LLM plan + LLM

Rules (``rules``), the step splitter (``steps``), the mixture (``mixture``), the policy (``policy``) and the cost
of a trace (``trace``) are pure; ``strategies`` drives tiers (``tiers.Tiers``: engines in process or Serve
handles) with those rules.
"""

STRATEGIES = ("cascade", "steer", "stepwise_policy", "cope")
