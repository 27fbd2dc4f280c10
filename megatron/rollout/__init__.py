"""Online RL: rollouts from the policy, rewards and advantages (see ARCHITECTURE.md)."""
