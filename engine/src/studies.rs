//! `wardflow studies` and `wardflow researchers`: registering studies and
//! the accounts that read them, and what each study released and spent.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Subcommand;
use wardflow_research::release::BudgetPlan;
use wardflow_research::spec::Study;
use wardflow_research::store::{
    Researchers, StudyFiles, add_study, close_study, list_studies, read_study,
};

#[derive(Subcommand, Debug)]
pub enum StudiesCommand {
    /// Check a study file and register it (a running engine picks it up within a second)
    Add { file: PathBuf },
    /// Check study files without registering them
    Check { files: Vec<PathBuf> },
    /// Every registered study, its state and budget
    List,
    /// One study's definition, budget plan and state
    Show { id: String },
    /// Close a study: its streams end and it releases nothing more
    Close { id: String },
    /// What a study released and who read it: per researcher, and per patient windows contributed
    Usage { id: String },
}

#[derive(Subcommand, Debug)]
pub enum ResearchersCommand {
    /// Add a researcher account; prints its secret (for the Flight handshake)
    Add {
        id: String,
        /// Use this secret instead of a generated one (at least 16 characters)
        #[arg(long)]
        secret: Option<String>,
    },
    /// Remove a researcher account
    Remove { id: String },
    /// List researcher accounts
    List,
}

fn state_of(f: &StudyFiles) -> &'static str {
    if f.closed {
        "closed"
    } else if !f.state.can_release(&BudgetPlan::new(&f.study)) {
        "budget spent"
    } else {
        "running"
    }
}

pub fn studies(data: &Path, cmd: &StudiesCommand) -> anyhow::Result<()> {
    match cmd {
        StudiesCommand::Add { file } => {
            let s = add_study(data, file)?;
            let plan = BudgetPlan::new(&s);
            println!(
                "study {} registered: {} windows of {} s, k = {}, ε = {} at δ = {} (ρ = {:.6}: {:.6} per window{})",
                s.id,
                s.windows,
                s.window_ms / 1000,
                s.k,
                s.epsilon,
                s.delta,
                plan.rho_total,
                plan.rho_window,
                if s.running_totals {
                    format!(", {:.6} for the running totals", plan.rho_tree)
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        StudiesCommand::Check { files } => {
            let mut failed = 0;
            for f in files {
                match Study::load(f) {
                    Ok(s) => println!("{}: study {} ok", f.display(), s.id),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{e}");
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} study files refused", files.len());
            }
            Ok(())
        }
        StudiesCommand::List => {
            println!("study\tstate\twindows\tepsilon_spent\tepsilon\tresearchers\ttitle");
            for f in list_studies(data)? {
                println!(
                    "{}\t{}\t{}/{}\t{:.4}\t{}\t{}\t{}",
                    f.study.id,
                    state_of(&f),
                    f.state.windows_released,
                    f.study.windows,
                    f.state.accountant.spent_epsilon(f.study.delta),
                    f.study.epsilon,
                    f.study.researchers.join(","),
                    f.study.title
                );
            }
            Ok(())
        }
        StudiesCommand::Show { id } => {
            let f = read_study(data, id)?;
            let s = &f.study;
            let plan = BudgetPlan::new(s);
            println!("study:        {}", s.id);
            println!("title:        {}", s.title);
            println!("state:        {}", state_of(&f));
            println!("researchers:  {}", s.researchers.join(", "));
            println!(
                "metrics:      {}",
                s.metrics
                    .iter()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!("window:       {} s, tumbling", s.window_ms / 1000);
            println!(
                "group by:     {}",
                s.group_by
                    .iter()
                    .map(|a| a.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!("k:            {}", s.k);
            println!(
                "budget:       ε = {} at δ = {} (ρ = {:.6}), {} windows",
                s.epsilon, s.delta, plan.rho_total, s.windows
            );
            println!(
                "per window:   ρ = {:.6}; σ patients {:.3}, σ readings {:.3}; quantile ε {:.4} per row; {} rows per patient",
                plan.rho_window,
                plan.sigma_patients,
                plan.sigma_readings,
                plan.quantile_epsilon,
                plan.rows
            );
            if s.running_totals {
                println!(
                    "running totals: ρ = {:.6} for the horizon, σ per tree node {:.3}",
                    plan.rho_tree, plan.sigma_tree
                );
            }
            println!(
                "released:     {} windows, ε spent {:.4} (ρ {:.6})",
                f.state.windows_released,
                f.state.accountant.spent_epsilon(s.delta),
                f.state.accountant.spent_rho
            );
            Ok(())
        }
        StudiesCommand::Close { id } => {
            close_study(data, id)?;
            println!("study {id} closed");
            Ok(())
        }
        StudiesCommand::Usage { id } => {
            let f = read_study(data, id)?;
            let c = &f.contributions;
            println!(
                "study {}: {} windows released, {} rows, ε spent {:.4} of {} (δ = {})",
                f.study.id,
                f.state.windows_released,
                c.rows_released,
                f.state.accountant.spent_epsilon(f.study.delta),
                f.study.epsilon,
                f.study.delta
            );
            println!(
                "rows withheld: {} below k, {} to protect them",
                c.suppressed_primary, c.suppressed_complementary
            );
            println!("researcher\tstreams\tbatches\trows\tbytes");
            for (who, u) in &f.usage.readers {
                println!(
                    "{who}\t{}\t{}\t{}\t{}",
                    u.streams, u.batches, u.rows, u.bytes
                );
            }
            println!("patient\twindows_contributed");
            for (p, n) in &c.patients {
                println!("{p}\t{n}");
            }
            Ok(())
        }
    }
}

pub fn researchers(data: &Path, cmd: &ResearchersCommand) -> anyhow::Result<()> {
    match cmd {
        ResearchersCommand::Add { id, secret } => {
            let secret = Researchers::add(data, id, secret.clone())?;
            println!("{secret}");
            Ok(())
        }
        ResearchersCommand::Remove { id } => {
            Researchers::remove(data, id)?;
            println!("researcher {id} removed");
            Ok(())
        }
        ResearchersCommand::List => {
            for r in Researchers::load(data)?.researchers.values() {
                println!("{}", r.id);
            }
            Ok(())
        }
    }
}
