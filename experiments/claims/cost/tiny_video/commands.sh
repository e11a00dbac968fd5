python experiments/claims/claims.py cost --model tiny_video
