"""The BentoML ranking service (`serving.service:RankingService`) and its bentofile."""
