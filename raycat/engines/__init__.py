"""Model backends behind ``Scorer`` / ``Generator``, and the Ray Data shell that runs them.

base.py holds the types and the choice of backend; vllm_engine.py (product path, with
first_token.py's in-sampler entropy), transformers_engine.py (reference) and openai_http.py (a hosted
teacher) implement them; actor_pool.py is the actor-pool shell that score, teach and eval share.
"""
